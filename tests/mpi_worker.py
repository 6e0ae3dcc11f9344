"""One rank of a data-parallel test run, with an optional injected fault.

    mpirun -np 2 python tests/mpi_worker.py CONFIG_JSON [FAULT]

FAULT (on rank 1, at iteration 3): ``die`` (os._exit), ``hang`` (sleeps instead
of joining the step's reduction), ``perturb`` (changes one weight, so the
ranks' parameters drift apart).  The test harness, not the library, holds the
faults.  Exit status: the run's (0 completed/diverged, 130+ interrupted) or 1
for an error, which is printed as one line.
"""
import json
import os
import signal
import sys
import time

from tinynorm.parallel import ParallelError
from tinynorm.train import Trainer

cfg = json.loads(sys.argv[1])
fault = sys.argv[2] if len(sys.argv) > 2 else ""


class FaultyTrainer(Trainer):
    def _reduce_step(self, *args):
        if self.comm.rank == 1 and self.opt.iteration == 3:
            if fault == "die":
                os._exit(7)
            if fault == "hang":
                time.sleep(3600)
            if fault == "perturb":
                next(iter(self.model.parameters().values())).reshape(-1)[0] += 1e-3
        return super()._reduce_step(*args)


try:
    resume = bool(cfg.pop("_resume", False))
    trainer = FaultyTrainer(cfg, resume=resume, overwrite=not resume)
    status = trainer.run()
except ParallelError as e:
    print(f"error: {e}", flush=True)
    sys.exit(1)
print(f"rank {trainer.comm.rank}: {status} {trainer.interrupted_reason}", flush=True)
if status == "interrupted":
    sys.exit(128 + signal.SIGTERM)
