"""Run under torchrun (or alone): one paired training step on this rank's share of a fixed draw of tiles; rank 0
saves the generator's and discriminator's gradients (all-reduced under DDP) and weights after the step."""

import sys
from pathlib import Path

import torch

from consingan.config import PairedConfig
from consingan.distributed import Distributed, unwrap
from consingan.paired.data import TileDataset, load_pairs
from consingan.paired.trainer import PairedTrainer
from consingan.runs import RunFolder


def main(source: str, target: str, out: str) -> None:
    distributed = Distributed.from_environment()
    device = distributed.start(torch.device("cpu"))
    batch = 4 // distributed.world_size  # the same global batch of 4 tiles
    config = PairedConfig(dimension=2, model="resnet", tile=16, stride=16, num_feature_channels=4, seed=3, device="cpu",
                          batch_size=batch, source_dir=source, target_dir=target,
                          out_dir=str(Path(out).parent / f"runs_{distributed.world_size}_{distributed.rank}")).validate()
    data = load_pairs(Path(source), Path(target), 2, False)
    torch.manual_seed(3)
    trainer = PairedTrainer(config, data, RunFolder.create(config, "paired"), None, device, distributed)
    tiles = TileDataset(data, 16, 16)
    draw = torch.randperm(len(tiles), generator=torch.Generator().manual_seed(4)).tolist()[:4]
    mine = distributed.shard(draw)
    source_batch, target_batch = (torch.stack(items) for items in zip(*[tiles[i] for i in mine]))
    trainer.step(source_batch, target_batch)
    if distributed.is_main:
        models = (("g", trainer.generator), ("d", trainer.discriminator))
        grads = {f"{name}.{key}": p.grad.clone() for name, model in models for key, p in unwrap(model).named_parameters()}
        weights = {f"{name}.{key}": p.detach().clone() for name, model in models
                   for key, p in unwrap(model).named_parameters()}
        torch.save({"grads": grads, "weights": weights}, out)
    distributed.finish()


if __name__ == "__main__":
    main(*sys.argv[1:4])
