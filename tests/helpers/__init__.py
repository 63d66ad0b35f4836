"""What the tests share: reference checkpoints, small models and tokenizers, servers on loopback."""
