"""`python -m pact.cli ...` with accelerate's FSDP allowed on CPU processes; tests/test_distributed.py runs it under torchrun.

accelerate turns FSDP on only for GPU-like distributed types: on CPU
processes (`MULTI_CPU`) it drops the FSDP plugin the Trainer hands it, and
the run trains unsharded (which `PactTrainer` refuses). PyTorch's FSDP2
itself runs on CPU with gloo, so this script sets, after accelerate has
chosen `MULTI_CPU` for a run given an FSDP plugin, the distributed type and
plugin accelerate sets on GPUs, and changes nothing else: the model is then
sharded, trained, gathered and saved by accelerate's and the Trainer's own
FSDP2 code, as on GPUs, with gloo in place of NCCL.
"""

import sys

import accelerate.state
from accelerate.utils import DistributedType

from pact.cli.main import main

_accelerator_state_init = accelerate.state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    """`AcceleratorState.__init__`, then FSDP where accelerate chose plain CPU data parallelism for an FSDP run."""
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
