"""Triton implementations of the rlhf_kernels ops.

Every module here imports triton at its top and is imported only at the first dispatch to the
``triton`` backend (see :mod:`rlhf_kernels._backend`); nothing else in the package imports it.
Each module holds, per op, the private ``@triton.jit`` kernels, a launcher that picks block sizes
and allocates outputs, and (where the op is differentiable) the ``autograd.Function``. The
pure-PyTorch references next to the public functions are the oracle these are tested against.
"""
