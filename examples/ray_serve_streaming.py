"""An OpenAI-compatible endpoint on Ray Serve LLM, with streaming on in every replica.

``ray.serve.llm`` runs one vLLM engine per replica (CPU bundles here) and routes
requests with its prefix-affinity router, so the turns of one conversation go to
the replica that holds its stream: each turn resumes the stream the last one left
(a vllm-sink snapshot) instead of streaming the whole history again. With
``--snapshot-dir`` on storage every replica reaches, any replica resumes any
conversation, and a restarted deployment resumes the conversations it had.

    pip install 'vllm-sink[ray]'
    .venv/bin/python examples/ray_serve_streaming.py [--replicas 2] [--port 8000]
    # then any OpenAI client: base_url http://127.0.0.1:8000/v1, model "smollm2"

Like the Ray Data example, each engine runs its OpenMP threads unbound
(``VLLM_CPU_OMP_THREADS_BIND=nobind``) so that replicas on one machine do not
share a core. Ctrl-C (or SIGTERM) stops it and its replicas.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def llm_config(args: argparse.Namespace):
    """The ``LLMConfig`` of a streaming model: the settings ride in ``engine_kwargs``."""
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": args.model_id, "model_source": args.model},
        accelerator_config={"kind": "cpu"},
        engine_kwargs=dict(
            dtype="float32",  # faster than bf16 on CPUs without native bf16 matmuls
            enforce_eager=not args.compile,
            block_size=args.block_size,
            max_num_batched_tokens=args.chunk,
            additional_config={
                "streaming_sinks": args.sinks,
                "streaming_window": args.window,
                "streaming_snapshots": args.snapshots,
                **({"streaming_snapshot_dir": args.snapshot_dir} if args.snapshot_dir else {}),
            },
        ),
        placement_group_config={"bundles": [{"CPU": args.threads}]},
        runtime_env={
            "env_vars": {
                "VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib),
                "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "OMP_NUM_THREADS": str(args.threads),
            }
        },
        deployment_config={
            "num_replicas": args.replicas,
            "request_router_config": {
                "request_router_class": "ray.serve.llm.request_router.PrefixCacheAffinityRouter"
            },
        },
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--model-id", default="smollm2", help="the name clients ask for")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--snapshots", type=int, default=64, help="finished streams kept")
    parser.add_argument(
        "--snapshot-dir", default=None, help="snapshots also kept here, shared by the replicas"
    )
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens)")
    parser.add_argument("--replicas", type=int, default=2, help="vLLM engines")
    parser.add_argument("--threads", type=int, default=1, help="CPU cores per engine")
    parser.add_argument("--kv-gib", type=int, default=2, help="KV cache per engine (GiB)")
    parser.add_argument("--compile", action="store_true", help="torch.compile (slow start)")
    parser.add_argument("--port", type=int, default=8000)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    # Ray's CPU bookkeeping (not cores): each replica's actor (1) and its engine
    # (--threads), and two for Serve's proxy and OpenAI ingress.
    ray.init(num_cpus=args.replicas * (1 + args.threads) + 2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_openai_app({"llm_configs": [llm_config(args)]}), blocking=False)
    print(f"ready: http://127.0.0.1:{args.port}/v1 (model {args.model_id!r})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop as on Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
