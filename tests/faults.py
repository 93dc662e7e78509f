"""A GPT-2 that fails on one data-parallel rank only, as one GPU of two does: the faults reach the
worker processes with the model itself (it is pickled by class name, and the workers import this
module), so the real launcher, collectives and loop are what is tested."""
from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import GPT2LMHeadModel


class FaultyGPT2(GPT2LMHeadModel):
    fault = ""  # "oom": training forwards over more than 2 blocks run out of memory; "nan": NaN logits
    fault_rank = 1

    def forward(self, input_ids=None, **kwargs):
        here = self.training and dist.is_initialized() and dist.get_rank() == self.fault_rank
        if here and self.fault == "oom" and input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (on this rank only)")
        output = super().forward(input_ids=input_ids, **kwargs)
        if here and self.fault == "nan":
            output.logits = output.logits * float("nan")
        return output


def faulty(model: GPT2LMHeadModel, fault: str, rank: int = 1) -> GPT2LMHeadModel:
    """`model` itself, failing with `fault` on `rank`."""
    model.__class__ = FaultyGPT2
    model.fault, model.fault_rank = fault, rank
    return model
