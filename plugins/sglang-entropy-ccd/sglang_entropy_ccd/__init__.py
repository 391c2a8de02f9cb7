"""sglang-entropy-ccd: CCD-style adaptive unmasking with SchED early exit for diffusion LMs."""
