"""MAE train-step time on CPU: vitforge's MAE against Hugging Face ``ViTMAEForPreTraining``.

Same shapes on both sides (encoder width/depth/heads/MLP, decoder width/depth/heads/MLP, image
and patch size, mask ratio 0.75, norm_pix_loss), both with SDPA attention, both fp32, AdamW
with the same hyper-parameters. One step = forward + backward + optimizer step on one batch.
Runs alternate between the two models (A B A B …) so background load hits both alike; the
median step time of each is reported, and the ratio ours / theirs is printed last.

    python bench/train_bench.py                 # default: ViT-Ti width, depth 6, 4 px patches at 32 px, decoder 128x2, batch 32
    python bench/train_bench.py --threads 2 --steps 10 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def ours(args):
    from jobs.mae import MAEConfig, build_mae

    cfg = MAEConfig(name="bench", data="/none",
                    model={"arch": "vit_small_patch16_224", "img_size": args.img, "patch_size": args.patch,
                           "depth": args.depth, "embed_dim": args.width, "num_heads": args.heads},
                    decoder={"embed_dim": args.dec_width, "depth": args.dec_depth, "num_heads": args.dec_heads},
                    norm_pix_loss=True)
    model = build_mae(cfg)
    length = (args.img // args.patch) ** 2

    def step(x):
        loss, _, _ = model(x, torch.rand(x.shape[0], length))
        return loss

    return model, step


def theirs(args):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(hidden_size=args.width, num_hidden_layers=args.depth, num_attention_heads=args.heads,
                       intermediate_size=4 * args.width, decoder_hidden_size=args.dec_width,
                       decoder_num_hidden_layers=args.dec_depth, decoder_num_attention_heads=args.dec_heads,
                       decoder_intermediate_size=4 * args.dec_width, image_size=args.img, patch_size=args.patch,
                       mask_ratio=0.75, norm_pix_loss=True, qkv_bias=True)
    model = ViTMAEForPreTraining._from_config(cfg, attn_implementation="sdpa")

    def step(x):
        return model(pixel_values=x).loss

    return model, step


def timed_steps(model, step, x, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--dec-width", type=int, default=128)
    p.add_argument("--dec-depth", type=int, default=2)
    p.add_argument("--dec-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="timed steps per round (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img, args.img)
    sides = {"vitforge MAE": ours(args), "HF ViTMAEForPreTraining": theirs(args)}
    for name, (model, _) in sides.items():
        print(f"{name}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f} M trainable params")
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for name, (model, step) in sides.items():
        timed_steps(model, step, x, 2)  # warm-up
    for _ in range(args.rounds):
        for name, (model, step) in sides.items():
            samples[name] += timed_steps(model, step, x, args.steps)
    print(f"config: img {args.img}, patch {args.patch}, encoder {args.width}x{args.depth} ({args.heads} heads), "
          f"decoder {args.dec_width}x{args.dec_depth} ({args.dec_heads} heads), batch {args.batch}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    med = {name: statistics.median(t) for name, t in samples.items()}
    for name, t in samples.items():
        print(f"{name:26s} median {med[name] * 1000:8.1f} ms/step  min {min(t) * 1000:8.1f}  "
              f"{args.batch / med[name]:7.1f} img/s  (n={len(t)})")
    print(f"ratio ours/theirs: {med['vitforge MAE'] / med['HF ViTMAEForPreTraining']:.3f}")


if __name__ == "__main__":
    main()
