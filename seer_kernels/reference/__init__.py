"""Pure-torch references: the specification of every op, the CPU fallback and the test oracle."""
