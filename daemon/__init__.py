"""kvfsd: the kvfs daemon (engine, socket server, background work)."""
