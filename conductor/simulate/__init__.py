"""The conductor's trace-driven simulator: the real placement code over simulated nodes."""
