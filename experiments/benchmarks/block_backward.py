"""Time the forward and the forward plus backward of one transformer block and its parts.

    python experiments/benchmarks/block_backward.py --width 768 --heads 12 --batch 8 --tokens 256

Prints, for a `Block`, its `Attention` and its `Mlp`, the forward time, the
forward-plus-backward time (gradients with respect to the parameters and the input, for a
random output gradient) and their ratio. A ratio near 3 is what a matmul-bound layer
costs; a part well above that is where a training step loses time.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from aim_jax import layers


def best_time(fn, *args, repeats: int = 3) -> float:
    """Return the fastest of `repeats` timed calls after one warm-up call, in seconds."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768, help="model width D")
    parser.add_argument("--heads", type=int, default=12, help="attention heads")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per image")
    parser.add_argument("--prefix", type=int, default=100, help="prefix length of the mask")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, args.tokens, args.width), np.float32))
    mask = layers.attention_mask(
        "prefix", args.tokens, jnp.full((args.batch,), args.prefix, jnp.int32)
    )
    parts = [
        ("block", layers.Block(args.heads, 4, 1e-5), (x, mask)),
        ("attention", layers.Attention(args.heads), (x, mask)),
        ("mlp", layers.Mlp(4 * args.width), (x,)),
    ]
    print(f"batch {args.batch}, {args.tokens} tokens, width {args.width}, {args.heads} heads")
    print(f"{'part':<12} {'forward ms':>11} {'fwd+bwd ms':>11} {'ratio':>6}")
    for name, module, inputs in parts:
        params = module.init(jax.random.key(0), *inputs)
        output_shape = jax.eval_shape(module.apply, params, *inputs).shape
        # A random output gradient, because with a plain sum XLA may turn a kernel gradient
        # (a product with a matrix of ones) into a cheaper reduction.
        cotangent = jnp.asarray(rng.standard_normal(output_shape, np.float32))

        def total(p, *a, module=module, cotangent=cotangent):
            return (module.apply(p, *a) * cotangent).sum()

        forward = best_time(jax.jit(total), params, *inputs)
        backward = best_time(jax.jit(jax.grad(total, argnums=(0, 1))), params, *inputs)
        print(f"{name:<12} {forward * 1e3:11.1f} {backward * 1e3:11.1f} {backward / forward:6.2f}")


if __name__ == "__main__":
    main()
