import torch

# One intra-op thread: on a 2-core machine shared with other work, OpenMP's
# spinning threads make small ops erratically slow. test_ops.py checks that the
# CPU kernels give the same result with several threads.
torch.set_num_threads(1)
