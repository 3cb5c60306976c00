"""Applications: the demo, experiments, scale sweeps, the benchmark runner, the autotune table builder, the CLI.

`python -m neuralmem_fast {demo|bench|scale|autotune}`. Their plotting and
progress-bar dependencies (matplotlib, tqdm, scikit-learn) are the `apps`
extra: `pip install neuralmem_fast[apps]`. Nothing in the library imports
this package.
"""
