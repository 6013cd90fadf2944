"""The parts of Partial FC behind the `partial_fc.PartialFC` facade.

shards     class ranges, the seeded initial centres, shard files + manifest (save / load with re-sharding)
sampling   the sample size policy and the seeded class scores both backends draw from (same classes on both)
comm       the head's collectives: on NumPy arrays (numpy backend) and on device tensors (paddle backend)
spec       what the facade tells a backend (HeadSpec), the optimizers' state arrays
numpy_head the CPU backend: NumPy blocks on a thread pool, factored head gradient
paddle_head the device backend: Paddle tensors only, no host synchronisation in forward, backward or step
amp        AMP loss scaling with one skip decision over the backbone's and the head's gradients
"""
