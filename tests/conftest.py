import os

# Before torch is imported: spinning OpenMP threads make small CPU models 5-10x slower whenever
# another process competes for the cores (see Makefile).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
