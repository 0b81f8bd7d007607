/*
 * recv_spin: wait for a reply from the daemon without paying the wake-up.
 *
 * Why: a client that blocks in recv() sleeps, and the reply must wake it
 * (an inter-processor interrupt, a reschedule; under a hypervisor one
 * more exit). Measured on the 2-core CI VM, a ping-pong between two
 * processes over a Unix socket takes 78 us at p50 when both block and 28 us
 * when the waiting side polls instead; the daemon's answer to a request
 * that does nothing took 110 us blocked and 52 us polled. A request from
 * an inference engine is answered in tens of microseconds, so polling
 * that long costs little CPU and saves most of a round trip.
 *
 * Invariants: the GIL is released while waiting (other threads of the
 * engine run); after spin_ns it blocks in poll(), so an idle or slow daemon
 * costs no CPU; a signal is handed to Python (Ctrl-C still interrupts a
 * wait) and the wait goes on blocking.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* >= 0: bytes received (0: the peer closed); -1: *err holds errno. */
static ssize_t recv_wait(int fd, char *p, size_t n, long long spin_ns, int *err) {
    long long until = spin_ns > 0 ? now_ns() + spin_ns : 0;
    for (;;) {
        ssize_t k = recv(fd, p, n, MSG_DONTWAIT);
        if (k >= 0) return k;
        if (errno != EAGAIN && errno != EWOULDBLOCK) { *err = errno; return -1; }
        if (until == 0 || now_ns() >= until) break;
    }
    struct pollfd pfd = {fd, POLLIN, 0};
    for (;;) {
        if (poll(&pfd, 1, -1) < 0) { *err = errno; return -1; }
        ssize_t k = recv(fd, p, n, MSG_DONTWAIT);
        if (k >= 0) return k;
        if (errno != EAGAIN && errno != EWOULDBLOCK) { *err = errno; return -1; }
    }
}

PyObject *kv_recv_spin(PyObject *self, PyObject *args) {
    PyObject *sock;
    Py_buffer buf;
    long long spin_ns;
    if (!PyArg_ParseTuple(args, "Ow*L", &sock, &buf, &spin_ns)) return NULL;
    int fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0) { PyBuffer_Release(&buf); return NULL; }
    ssize_t k;
    int err = 0;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        k = recv_wait(fd, buf.buf, (size_t)buf.len, spin_ns, &err);
        Py_END_ALLOW_THREADS
        if (k >= 0) break;
        if (err != EINTR) {
            PyBuffer_Release(&buf);
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (PyErr_CheckSignals() < 0) { PyBuffer_Release(&buf); return NULL; }
        spin_ns = 0;
    }
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(k);
}

/* ---- replies that keep the GIL ------------------------------------------
 *
 * Why: CPython releases the GIL around every socket.send. In the daemon
 * another thread is nearly always waiting for it, so each such call hands
 * the GIL over (a futex wake, a context switch, and a wait to get it back):
 * a profile of lone puts showed 12% of the daemon's CPU in futex wakes,
 * mostly from the T0 journal's writes (now stores into a mapping:
 * kvfsd.t0journal) and the replies' sends. A non-blocking send of a reply
 * takes microseconds and never sleeps, so holding the GIL through it costs
 * the other threads less than the hand-over does.
 */

/* send_held(fd, data) -> bytes sent, 0 if the socket's buffer is full: a
   non-blocking send(2), the GIL held, retried on EINTR */
PyObject *kv_send_held(PyObject *self, PyObject *args) {
    (void)self;
    int fd;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "iy*", &fd, &b)) return NULL;
    ssize_t k;
    do {
        k = send(fd, b.buf, (size_t)b.len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (k < 0 && errno == EINTR && !PyErr_CheckSignals());
    PyBuffer_Release(&b);
    if (k < 0) {
        if (PyErr_Occurred()) return NULL;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return PyLong_FromLong(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(k);
}
