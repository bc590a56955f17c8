"""``python -m psi.check``: the prepared GPU check, one command that turns a GPU at hand into figures.

Stages, each in its own process and time box (a stage that fails or runs out of time is recorded, and
the next one runs), everything written to one JSON file (``--out``, rewritten after every stage, so
that a cut-off check loses nothing) and a short Markdown summary beside it:

- ``env``: torch, CUDA, cuDNN, the device and its memory, torchvision and nvjpeg, inductor's compile
  threads, the TF32 switches.
- ``tests``: the CUDA-only tests (marked ``cuda``; skipped on the CPU) through pytest, with their outcome.
- ``compile``: graphs and breaks of the model and of each compiled optimizer step, channels-last on and
  off, and the compiles across 50 steps whose tensor learning rate changes at every step.
- ``kernels``: CUDA kernels per optimizer step from ``torch.profiler``, eager and compiled, beside the
  aten ops and the kernel estimate of ``python -m psi.bench ops``.
- ``engine``: epoch time and images/s of SGD and PSI-SGDM in the engine, eager and compiled, their
  ratios (the paper's: 1.09 on a V100), and the engine against a bare loop.
- ``nvjpeg``: GPU-decoded batches against PIL's on a generated JPEG folder, with the GPU busy.
- ``cifar``: a real CIFAR-10 run from the JPEG archive, then a paired mini-study (SGD and PSI-SGDM at
  ``table1``, the same seeds, several runs at once on the GPU) sized to the rest of the budget.

The stages and the JSON keys are described on docs/gpus.md; ``--device cpu --tiny`` runs every stage
at toy sizes in seconds (tests/test_check.py), so that the check cannot rot between GPU sessions.

May import: everything (it checks every layer, as psi.bench measures every layer).
"""
