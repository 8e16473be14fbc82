"""What `python -m deepimage.bench.results record ID -- <command>` takes from each benchmark's
JSON: the page title, its place on the page, and the headline figures, each named by a dotted key
of the benchmark's output (`key`, optionally `spread_key`). The first figure is the headline.

Each entry also names the `command` that records it (what follows `--`). A figure's `scale`
multiplies the value (and the spread) read from the benchmark: the benchmarks report fractions,
seconds and bytes, the page shows %, ms and MiB. A key's part that is a number indexes a list
(`rows.1.efficiency`: the second row). Figures that a record holds beyond these (spreads over
several runs, the multi-scale study's verdicts and seed-pair control) are written by hand.
"""
from __future__ import annotations

MIB = 1 / 2**20
PAPER_TOP5 = {"ensemble": "paper, 256 + 512 px, ImageNet top-5: 6.97 %",
              "64": "paper, 512 px, ImageNet top-5: 7.42 %",
              "32": "paper, 256 px, ImageNet top-5: 7.96 %"}
SPREAD_TARGET = "every seed > 0, mean > 2 sd and > each model's sd"


def _multiscale(title: str, order: int, command: str) -> dict:
    """One set of the multi-scale study (`python -m deepimage.bench.multiscale --json`): errors in %
    with their sd over the seeds, and the paired gaps of the paper's two claims in points."""
    def error(model: str, name: str, metric: str = "top1_error", **extra) -> dict:
        return {"name": name, "key": f"summary.{model}.{metric}.mean", "unit": "%", "scale": 100, **extra}

    return {
        "title": f"Multi-scale study: {title}", "order": order, "command": command,
        "figures": [
            error("ensemble", "average of 32 and 64 px, top-1 error", baseline=PAPER_TOP5["ensemble"],
                  spread_key="summary.ensemble.top1_error.std"),
            error("64", "64 px, top-1 error", baseline=PAPER_TOP5["64"], spread_key="summary.64.top1_error.std"),
            error("32", "32 px, top-1 error", baseline=PAPER_TOP5["32"], spread_key="summary.32.top1_error.std"),
            error("ensemble", "average of 32 and 64 px, top-5 error", "top5_error"),
            {"name": "higher resolution beats lower: 32 px minus 64 px", "key": "paired.resolution.mean",
             "spread_key": "paired.resolution.sd", "unit": "points", "scale": 100,
             "baseline": "paper: 0.54 points top-5", "target": SPREAD_TARGET},
            {"name": "the average beats every single model: best model minus average", "key": "paired.ensemble.mean",
             "spread_key": "paired.ensemble.sd", "unit": "points", "scale": 100,
             "baseline": "paper: 0.45 points top-5", "target": SPREAD_TARGET},
        ],
    }


_MS = "python -m deepimage.bench.multiscale --dataset realphoto {} --seeds 0 1 2 3 4 " \
      "--config deepimage/bench/recipes/scratch40.yaml"
_CENTRE = " --config centre.yaml --json  # centre.yaml: evaluate: {view: centre}"
_TRAIN_STEP = "OMP_NUM_THREADS=1 python -m deepimage.bench.train_step --json --rounds 3"

HEADLINES: dict[str, dict] = {
    "scaling": {
        "title": "Scaling efficiency at 2 workers",
        "order": 20,
        "command": "sh -c 'snakemake --cores 2 --forcerun measure_scaling results/scaling/scaling.json >&2 && "
                   "python -m json.tool --compact results/scaling/scaling.json'",
        "figures": [
            {"name": "np=2 scaling efficiency", "key": "rows.1.efficiency", "unit": "%", "scale": 100,
             "target": ">= 85 %"},
            {"name": "np=1 throughput", "key": "rows.0.images_per_s", "unit": "img/s"},
            {"name": "np=2 throughput", "key": "rows.1.images_per_s", "unit": "img/s"},
            {"name": "np=2 time blocked on communication", "key": "rows.1.split.comm_wait", "unit": "ms/step",
             "scale": 1000},
        ],
    },
    "allreduce": {
        "title": "Butterfly all-reduce against Horovod and torch.distributed",
        "order": 30,
        "command": "python -m deepimage.bench.allreduce --json",
        "figures": [
            {"name": "Horovod time / butterfly time, 16 MiB", "key": "speedup_vs_horovod_16MiB", "unit": "x",
             "baseline": "hvd.allreduce_ (gloo ring)", "target": ">= 1.5x"},
            {"name": "torch time / butterfly time, 16 MiB", "key": "ratio_vs_torch_16MiB", "unit": "x",
             "baseline": "torch.distributed.all_reduce (gloo)", "target": ">= 0.9"},
            {"name": "lowest Horovod time / butterfly time, 16-64 MiB", "key": "min_speedup_vs_horovod_ge_16MiB",
             "unit": "x", "target": ">= 1.5x"},
            {"name": "lowest torch time / butterfly time, 16-64 MiB", "key": "min_ratio_vs_torch_ge_16MiB",
             "unit": "x", "target": ">= 0.9"},
        ],
    },
    "allreduce_mpi": {
        "title": "Butterfly all-reduce against MPI and the memory-bandwidth limit",
        "order": 31,
        "command": "python -m deepimage.bench.allreduce --sizes 1 4 16 64 --json",
        "figures": [
            {"name": "MPI time / butterfly time, 16 MiB", "key": "ratio_vs_mpi_16MiB", "unit": "x",
             "baseline": "MPI_Allreduce (MPICH, shared memory)", "target": ">= 1"},
            {"name": "MPI time / butterfly time, 1 MiB", "key": "ratio_vs_mpi_1MiB", "unit": "x", "target": ">= 1"},
            {"name": "MPI time / butterfly time, 4 MiB", "key": "ratio_vs_mpi_4MiB", "unit": "x", "target": ">= 1"},
            {"name": "MPI time / butterfly time, 64 MiB", "key": "ratio_vs_mpi_64MiB", "unit": "x", "target": ">= 1"},
            {"name": "limit time / butterfly time, 16 MiB", "key": "limit_fraction_16MiB", "target": ">= 0.5"},
            {"name": "limit time / butterfly time, 64 MiB", "key": "limit_fraction_64MiB", "target": ">= 0.5"},
        ],
    },
    "train_step_ddp": {
        "title": "Training step against PyTorch DDP",
        "order": 40,
        "command": _TRAIN_STEP,
        "figures": [
            {"name": "DDP time / lazy update with split FC time, default model", "key": "lazy_vs_ddp", "unit": "x",
             "baseline": "torch DistributedDataParallel (gloo, 25 MiB buckets)", "target": ">= 1.0"},
            {"name": "DDP time / lazy update with split FC time, FC-heavy model", "key": "lazy_vs_ddp_fc_heavy",
             "unit": "x", "target": ">= 1.0"},
            {"name": "lazy update with split FC, default model", "key": "models.default.step_ms.lazy_split",
             "unit": "ms/step"},
            {"name": "lazy update with split FC, FC-heavy model", "key": "models.fc_heavy.step_ms.lazy_split",
             "unit": "ms/step"},
        ],
    },
    "lazy_update": {
        "title": "Lazy update against synchronous all-reduce and Horovod",
        "order": 41,
        "command": _TRAIN_STEP,
        "figures": [
            {"name": "lazy update, FC-heavy model", "key": "models.fc_heavy.step_ms.lazy", "unit": "ms/step"},
            {"name": "lazy update faster than synchronous (ratio of the medians)",
             "key": "models.fc_heavy.lazy_speedup_vs_sync", "unit": "%", "scale": 100, "target": ">= 10 %"},
            {"name": "lazy update faster than Horovod's DistributedOptimizer (ratio of the medians)",
             "key": "models.fc_heavy.lazy_speedup_vs_horovod", "unit": "%", "scale": 100, "target": ">= 0 %"},
            {"name": "synchronous butterfly (all buckets after backward)", "key": "models.fc_heavy.step_ms.sync",
             "unit": "ms/step"},
            {"name": "Horovod DistributedOptimizer", "key": "models.fc_heavy.step_ms.horovod", "unit": "ms/step"},
            {"name": "compute only, no communication", "key": "models.fc_heavy.step_ms.compute", "unit": "ms/step"},
        ],
    },
    "split_fc": {
        "title": "Split FC layers against replicated FC layers",
        "order": 50,
        "command": "python -m deepimage.bench.split_fc --json",
        "figures": [
            {"name": "step time, split FC / replicated FC", "key": "step_time_ratio",
             "baseline": "replicated FC, butterfly all-reduce of every gradient"},
            {"name": "bytes sent per step per rank, replicated / split", "key": "bytes_ratio", "unit": "x fewer"},
            {"name": "FC parameters per rank, split / replicated", "key": "fc_param_fraction_per_rank"},
            {"name": "step time, split FC", "key": "split.step_time_s", "unit": "ms", "scale": 1000},
            {"name": "bytes sent per step per rank, split FC", "key": "split.bytes_per_step", "unit": "MiB",
             "scale": MIB},
            {"name": "FC optimizer state per rank, split FC", "key": "split.fc_optimizer_state_bytes_per_rank",
             "unit": "MiB", "scale": MIB},
        ],
    },
    **{id_: _multiscale(title, order, command) for id_, title, order, command in (
        ("multiscale_one_set_40", "one real-photo set, 40 / 200 per class", 80,
         _MS.format("--rp-data-seed 0") + " --json"),
        ("multiscale_one_set_40_centre", "one real-photo set, 40 / 200 per class, centre view", 81,
         _MS.format("--rp-data-seed 0") + _CENTRE),
        ("multiscale_one_set_120", "one real-photo set, 120 / 200 per class", 82,
         _MS.format("--rp-train 120 --rp-val 200 --rp-data-seed 0") + " --json"),
        ("multiscale_one_set_120_centre", "one real-photo set, 120 / 200 per class, centre view", 83,
         _MS.format("--rp-train 120 --rp-val 200 --rp-data-seed 0") + _CENTRE),
        ("multiscale_per_seed_40", "real photos drawn per seed, 40 / 200 per class", 84,
         _MS.format("--rp-train 40 --rp-val 200") + " --json"),
        ("multiscale_per_seed_120", "real photos drawn per seed, 120 / 200 per class", 85,
         _MS.format("--rp-train 120 --rp-val 200") + " --json"),
        ("multiscale_second_set_40", "a second real-photo set (data seed 1), 40 / 200 per class", 86,
         _MS.format("--rp-data-seed 1") + " --json"),
        ("multiscale_second_set_120", "a second real-photo set (data seed 1), 120 / 200 per class", 87,
         _MS.format("--rp-train 120 --rp-val 200 --rp-data-seed 1") + " --json"),
        ("multiscale_synthetic", "the synthetic dataset", 88,
         "python -m deepimage.bench.multiscale --dataset synthetic --seeds 0 1 2 "
         "--config deepimage/bench/recipes/scratch40.yaml --json"),
    )},
    "gpu_step": {
        "title": "Training step on one GPU against a plain PyTorch loop",
        "order": 100,
        "command": "python -m deepimage.bench.gpu_step --json",
        "figures": [
            {"name": "our step, bf16 autocast, 224 px, batch 64", "key": "images_per_s.bf16", "unit": "img/s"},
            {"name": "ours / plain PyTorch loop, bf16", "key": "vs_plain_bf16", "target": ">= 0.90"},
            {"name": "our step, fp32 (TF32 convolutions)", "key": "images_per_s.fp32", "unit": "img/s"},
            {"name": "ours / plain PyTorch loop, fp32", "key": "vs_plain_fp32", "target": ">= 0.90"},
            {"name": "bf16 autocast / fp32, our step", "key": "bf16_speedup", "unit": "x"},
        ],
    },
    "predict": {
        "title": "Classifying images: `deepimage.predict` against a plain loop",
        "order": 110,
        "command": "python -m deepimage.bench.predict --json  # in the folder of a default run",
        "figures": [
            {"name": "deepimage.predict images/s / plain loop images/s", "key": "speedup", "unit": "x",
             "baseline": "a plain torch loop, one image at a time", "target": ">= 3x"},
            {"name": "deepimage.predict", "key": "predict_images_per_s", "unit": "img/s"},
            {"name": "CPU time per image, deepimage.predict", "key": "predict_cpu_ms_per_image", "unit": "ms"},
            {"name": "top-1 agreement with the plain loop", "key": "top1_agreement"},
        ],
    },
    "checkpoint": {
        "title": "Checkpoint cost",
        "order": 111,
        "command": "python -m deepimage.bench.checkpoint --json",
        "figures": [
            {"name": "write as training waits for it / torch.save", "key": "write_ratio_vs_torch_save", "unit": "x",
             "target": "<= 1.5x"},
            {"name": "step overhead of checkpoints in the default run's 64 px training", "key": "step_overhead",
             "unit": "%", "scale": 100, "target": "< 2 %"},
            {"name": "write as training waits for it (gather + serialize)", "key": "write_s", "unit": "s"},
            {"name": "of it, the gather to rank 0", "key": "gather_s", "unit": "s"},
            {"name": "until the file is durable (writer thread, fsync)", "key": "durable_s", "unit": "s"},
            {"name": "load (every worker reads and takes its shards)", "key": "load_s", "unit": "s"},
        ],
    },
    "tracking_load": {
        "title": "A team's tracking server under load: MLflow on PostgreSQL against SQLite",
        "order": 120,
        "command": "make tracking-server && python -m deepimage.bench.tracking_load "
                   "--tracking-uri http://127.0.0.1:5055 --compare-sqlite --json",
        "figures": [
            {"name": "metric writes per second, 8 writers, PostgreSQL-backed server",
             "key": "stress.server.writes_per_s", "unit": "/s", "baseline": "SQLite-backed server, below"},
            {"name": "lost or duplicated writes, PostgreSQL-backed server", "key": "stress.server.lost_writes"},
            {"name": "p50 latency of a logging call, PostgreSQL", "key": "stress.server.latency_p50_ms", "unit": "ms"},
            {"name": "p95 latency of a logging call, PostgreSQL", "key": "stress.server.latency_p95_ms", "unit": "ms"},
            {"name": "metric writes per second, SQLite-backed server", "key": "stress.sqlite_server.writes_per_s",
             "unit": "/s"},
            {"name": "p95 latency, SQLite-backed server", "key": "stress.sqlite_server.latency_p95_ms", "unit": "ms"},
            {"name": "max latency, SQLite-backed server", "key": "stress.sqlite_server.latency_max_ms", "unit": "ms"},
            {"name": "lost or duplicated writes, SQLite-backed server", "key": "stress.sqlite_server.lost_writes"},
            {"name": "metric writes per second, SQLite file as the tracking URI",
             "key": "stress.sqlite_file.writes_per_s", "unit": "/s"},
            {"name": "p95 latency, SQLite file", "key": "stress.sqlite_file.latency_p95_ms", "unit": "ms"},
            {"name": "max latency, SQLite file", "key": "stress.sqlite_file.latency_max_ms", "unit": "ms"},
            {"name": "workflows at once (2 experiments, 2 resolutions), all checks held", "key": "workflows.count"},
            {"name": "runs the workflows made", "key": "workflows.runs"},
        ],
    },
    "loader": {
        "title": "Data plane: the Arrow loader against torchvision and the decode-only limit",
        "order": 60,
        "command": "python -m deepimage.bench.loader --json",
        "figures": [
            {"name": "our loader / torchvision ImageFolder + transforms.v2, 256 px JPEG, 2 workers",
             "key": "vs_torchvision_256", "unit": "x", "decimals": 2, "target": ">= 2x"},
            {"name": "our loader / torchvision, 512 px JPEG", "key": "vs_torchvision_512", "unit": "x",
             "decimals": 2, "target": ">= 2x"},
            {"name": "decode and batch (augmentation on the device) / decode-only limit, 256 px",
             "key": "decode_limit_fraction_256", "decimals": 2, "target": ">= 0.8"},
            {"name": "decode and batch / decode-only limit, 512 px", "key": "decode_limit_fraction_512",
             "decimals": 2, "target": ">= 0.8"},
            {"name": "our loader, CPU augmentation, 256 px", "key": "arrow_img_s_256_jpeg", "unit": "img/s"},
            {"name": "torchvision, 256 px", "key": "torchvision_img_s_256", "unit": "img/s"},
            {"name": "decode and batch only, 256 px", "key": "arrow_decode_img_s_256", "unit": "img/s"},
            {"name": "decode-only limit, 256 px, 2 processes", "key": "decode_limit_img_s_256", "unit": "img/s"},
            {"name": "our loader, CPU augmentation, 512 px", "key": "arrow_img_s_512_jpeg", "unit": "img/s"},
            {"name": "torchvision, 512 px", "key": "torchvision_img_s_512", "unit": "img/s"},
            {"name": "decode and batch only, 512 px", "key": "arrow_decode_img_s_512", "unit": "img/s"},
            {"name": "decode-only limit, 512 px, 2 processes", "key": "decode_limit_img_s_512", "unit": "img/s"},
            {"name": "simplejpeg decode per core, 256 px", "key": "decode_img_s_per_core_simplejpeg_256",
             "unit": "img/s"},
            {"name": "simplejpeg decode per core, 512 px", "key": "decode_img_s_per_core_simplejpeg_512",
             "unit": "img/s"},
            {"name": "the paper's augmentations on one core, 256 px", "key": "augment_ms_all_256",
             "unit": "ms/image", "decimals": 2},
            {"name": "the paper's augmentations on one core, 512 px", "key": "augment_ms_all_512",
             "unit": "ms/image", "decimals": 2},
            {"name": "our loader / torchvision, 64 px raw", "key": "vs_torchvision_64", "unit": "x",
             "decimals": 1},
        ],
    },
}
