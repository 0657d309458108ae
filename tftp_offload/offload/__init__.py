"""The offload protocol: a backend in another process decides what each RRQ gets, over AMP on a UNIX socket.

One module per question:

    commands     what the two sides say (the AMP commands, answer kinds, versions)
    client       the TFTP server's side: `AMPBackend`, an `IBackend` that asks over the socket
    questions    one lookup: the request, the ReadRequest shared by identical ones, who waits for it
    connection   keeping that one connection up (backoff, reconnects) and greeted
    answers      what one answer is locally, and a reader of its own for each caller
    streams      a stream answer pulled with `ReadChunk`s into a bounded read-ahead
    cache        answers reused for a few seconds, bounded in count and bytes
    responder    the backend's side: any `IBackend` answering the server's commands
    serving      one backend reader read front to back for the server's `ReadChunk`s
    descriptors  when a descriptor passed to the server may be closed (once the kernel has it)
    service      offering a backend on a UNIX socket (`offload_service`)
    legacy_wire  the legacy MAAS offload format (MAAS 2.2 to 3.4), bytes only
    legacy       `LegacyBackend`: asking a MAAS rack controller over that format
"""
