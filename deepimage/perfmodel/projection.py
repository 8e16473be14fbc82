"""The projection: the paper's widths on each hardware file, every worker count of
perfmodel.np, each way of communicating (butterfly / ring / Horovod-style fused ring, lazy update
on and off, split FC on and off).

    rows = project(cfg, [load_hardware("minwa")])

Compute comes from the hardware file's measured profile where it has one for that resolution,
batch and bucket size (`python -m deepimage.perfmodel profile`), else from counted FLOPs.
"""
from __future__ import annotations

from deepimage.model import ModelSpec
from deepimage.perfmodel.costs import Hardware, Profile, step_time
from deepimage.perfmodel.profile import counted_profile, head_shape
from deepimage.perfmodel.spec import PAPER


def paper_spec() -> ModelSpec:
    return ModelSpec(num_classes=PAPER["num_classes"], conv=PAPER["conv"], fc_hidden=PAPER["fc_hidden"],
                     dropout=0.0)


def project(cfg, hardware: list[Hardware]) -> list[dict]:
    """The paper's widths at perfmodel.resolutions on each hardware, every np of perfmodel.np:
    butterfly and ring with lazy update on/off, Horovod-style fused ring, split FC on/off."""
    pc, spec, rows = cfg.perfmodel, paper_spec(), []
    head = head_shape(spec)
    variants = [(m, lazy, split) for m in ("butterfly", "ring") for lazy in (True, False) for split in (True, False)]
    variants += [("horovod", False, split) for split in (True, False)]
    for hw in hardware:
        for res in pc.resolutions:
            prof, source = projection_profile(hw, spec, pc.batch_size, res, cfg.train.bucket_mib)
            one = step_time(prof, 1, hw).total
            for method, lazy, split in variants:
                for n in pc.np:
                    s = step_time(prof, n, hw, method=method, lazy=lazy, split_fc=split, head=head)
                    rows.append({"hardware": hw.name, "resolution": res, "np": n, "method": method,
                                 "lazy": lazy, "split_fc": split, "step_s": s.total, "efficiency": one / s.total,
                                 "compute_from": source,
                                 "compute_s": s.compute, "split_fc_s": s.split_fc, "comm_exposed_s": s.comm_exposed})
    return rows


def projection_profile(hw: Hardware, spec: ModelSpec, batch: int, resolution: int,
                       bucket_mib: float) -> tuple[Profile, str]:
    """(profile, "measured" or "counted"): the hardware's measured profile of this resolution
    where it has one for this batch and bucket size, else counted at hw.flops_per_s."""
    prof, meta = hw.profiles.get(resolution), hw.profile_meta
    if prof is not None and prof.batch == batch and meta.get("bucket_mib") == bucket_mib \
            and meta.get("model") == spec.to_dict():
        return prof, "measured"
    return counted_profile(spec, batch, resolution, bucket_mib, hw.flops_per_s), "counted"
