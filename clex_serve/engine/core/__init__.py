"""The engine core, in plain Python with no tensors: the scheduler, the KV block manager, sequences and
requests. It plans each step and takes in its results; it never touches the device."""
