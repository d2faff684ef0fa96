"""The engine wire protocol: what the trainer side and the engine side both speak.

Both the rollout engines (portable_rl's CPU engine server) and the weight-sync strategies import from here, and
this package imports neither of them, so the two sides never import each other:
  * ``client``: async HTTP client of SGLang's native API (``EngineClient``, ``EngineError``);
  * ``engine_ops``: the engine calls a weight sync makes, as futures on one background loop (``EngineOps``);
  * ``buckets``: bucketing of named tensors and SGLang's flattened-bucket byte layout;
  * ``tensor_codec``: tensors passed by reference for ``/update_weights_from_tensor``;
  * ``checksum``: bit-exact weight checksums and the engine-vs-trainer comparison;
  * ``process_group``: the trainer->engine weight-update process group (the rendezvous SGLang performs).
"""
