"""Developer tools: the ``sglang-entropy`` command, benchmarks, the demo, the server launcher,
the default model's builder and the frontend client. Nothing in the runtime core (contract,
registry, settings, signals), the adapter or the CPU platform imports them."""
