"""The adapter in SGLang's scheduler process: per-slot device state, the decode-step observer,
stops, forks, diffusion unmasking and speculative routing."""
