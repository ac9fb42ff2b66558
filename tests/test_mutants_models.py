"""The model modules against independent references, written from mutation testing (docs/mutation_testing.md)."""
