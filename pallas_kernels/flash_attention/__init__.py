"""Dense causal attention with document (segment) boundaries, never forming [T, S]: the dense warm-up and the
dense baseline at 128K."""
