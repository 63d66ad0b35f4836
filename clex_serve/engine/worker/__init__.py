"""Everything of a step that touches the device: the model runner (KV pool, re-rotation of cached keys, CUDA
graphs) and the sampler with its penalty state, behind ``Worker.execute``."""
