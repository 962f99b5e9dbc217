"""Engine-side adapters (issue 6)."""
