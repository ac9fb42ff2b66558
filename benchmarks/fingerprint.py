"""Behaviour fingerprint of a kit checkout: sampling, extraction and training on tiny files, outputs hashed.

Checks that a change meant to move code changes no behaviour (sampling, extraction, DiT and tokenizer training): run it on a checkout from before and one
from after, then compare the two JSON files (the torch/numpy/python global RNG states saved in training
checkpoints depend on what ran earlier in the process, so `rng` and the file bytes may differ; every
tensor of model/EMA/optimizer, the data order, samples, shards, statistics, grids and logs may not).

    git archive HEAD | tar -x -C /tmp/before
    OMP_NUM_THREADS=1 python benchmarks/fingerprint.py /tmp/before /tmp/w1 /tmp/before.json
    OMP_NUM_THREADS=1 python benchmarks/fingerprint.py . /tmp/w2 /tmp/after.json --compare /tmp/before.json
"""
import hashlib, json, os, sys
from pathlib import Path

kit, work, out_json = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve()
compare = Path(sys.argv[sys.argv.index("--compare") + 1]) if "--compare" in sys.argv else None
sys.path.insert(0, str(kit))
os.chdir(kit)
os.environ["REPRO_RUNS_DIR"] = str(work / "runs")
os.environ["HF_HOME"] = str(work / "hf")
import numpy as np
import torch
from PIL import Image
torch.set_num_threads(1)
from tests.tiny_assets import write_tiny_assets

def sha(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()

def tensors_sha(obj):
    h = hashlib.sha256()
    def walk(o, prefix=""):
        if torch.is_tensor(o):
            h.update(prefix.encode()); h.update(o.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                walk(o[k], f"{prefix}/{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{prefix}/{i}")
        else:
            h.update(f"{prefix}={o!r}".encode())
    walk(obj)
    return h.hexdigest()

res = {}
assets = write_tiny_assets(work / "assets")
import yaml
cfg = yaml.safe_load((kit / "configs/tiny.yaml").read_text())
cfg["ckpt_path"] = str(assets["lightningdit-xl-800ep"])
cfg["vae"]["ckpt_path"] = str(assets["vavae-f16d32"])
cfg["data"]["data_path"] = str(assets["latents-stats"].parent)
cfg["train"]["output_dir"] = str(work / "out")
(work / "tiny_concrete.yaml").write_text(yaml.safe_dump(cfg))

# 1. sampling (FID mode + demo)
from steps.step4_inference import main as sample
r = sample(config=str(work / "tiny_concrete.yaml"), num_samples=10, batch_size=4, out=str(work / "samples"), progress=False)
res["samples.npz"] = sha(work / "samples/samples.npz")
res["pngs"] = {p.name: sha(p) for p in sorted((work / "samples/images").glob("*.png"))}
res["preview"] = sha(work / "samples/preview.png")
r = sample(config=str(work / "tiny_concrete.yaml"), demo=True, out=str(work / "demo"), progress=False)
res["demo_grid"] = sha(work / "demo/demo_samples.png")
for s in ("heun2", "rk4", "midpoint", "dopri5"):
    sample(config=str(work / "tiny_concrete.yaml"), num_samples=4, batch_size=4, out=str(work / f"s_{s}"),
           set=[f"sample.sampling_method={s}"], progress=False)
    res[f"npz_{s}"] = sha(work / f"s_{s}/samples.npz")

# 2. extraction
imgs = work / "images"
rng = np.random.default_rng(0)
for c in range(4):
    for i in range(12):
        a = (rng.random((72, 80, 3)) * 60 + c * 50).astype(np.uint8)
        (imgs / f"class_{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(imgs / f"class_{c}" / f"{i}.png")
from steps.step6_extract import main as extract
extract(str(work / "tiny_concrete.yaml"), source=str(imgs), out=str(work / "latents"), batch_size=8, shard_size=20)
res["shards"] = {p.name: sha(p) for p in sorted((work / "latents").glob("*.safetensors"))}
res["stats"] = sha(work / "latents/latents_stats.pt")
extract(str(work / "tiny_concrete.yaml"), source=str(imgs), out=str(work / "latents_m"), batch_size=8, shard_size=20, store="moments")
res["shards_moments"] = {p.name: sha(p) for p in sorted((work / "latents_m").glob("*.safetensors"))}

# 3. training: stage 0 with grids (VAE decode) and stage 1
from steps.step7_train import main as train
common = [f"data.data_path={work / 'latents'}", f"train.output_dir={work / 'train'}", "data.num_classes=4"]
train(config=str(kit / "configs/train/tiny_stage_0.yaml"),
      set=common + ["train.max_steps=20", "train.sample_every=10", f"vae.ckpt_path={assets['vavae-f16d32']}"])
train(config=str(kit / "configs/train/tiny_stage_0.yaml"), set=common + ["train.max_steps=30"])
ck = work / "train/tiny_two_stage/checkpoints"
for p in sorted(ck.glob("*.pt")):
    obj = torch.load(p, map_location="cpu", weights_only=True)
    res[f"ckpt_{p.name}"] = {k: tensors_sha(obj[k]) for k in ("model", "ema", "opt", "step", "data_order", "rng")}
    res[f"ckpt_{p.name}_bytes"] = sha(p)
res["grids"] = {p.name: sha(p) for p in sorted((work / "train/tiny_two_stage/samples").glob("*.png"))}
rows = [json.loads(l) for l in (work / "train/tiny_two_stage/log.jsonl").read_text().splitlines()]
res["log"] = [{k: v for k, v in r.items() if k in ("step", "loss", "mse", "cos", "grad_norm", "lr", "epoch")} for r in rows]
# accumulation path + grad clipping + ema_on_cpu
train(config=str(kit / "configs/train/tiny_stage_0.yaml"),
      set=common + ["train.max_steps=10", "train.exp_name=accum", "train.micro_batch_size=4", "optimizer.max_grad_norm=1.0", "train.ema_on_cpu=true"])
for p in sorted((work / "train/accum/checkpoints").glob("*.pt")):
    obj = torch.load(p, map_location="cpu", weights_only=True)
    res[f"accum_{p.name}"] = {k: tensors_sha(obj[k]) for k in ("model", "ema", "opt")}
# 4. tokenizer training (step 9): plain, then with the PatchGAN, EMA and VF (a small frozen network)
from repro.data.synthetic import make_digits_folder
from steps.step9_train_tokenizer import main as train_tok
make_digits_folder(work / "digits", size=16, per_class=4)
tiny_tok = ["model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
            "model.z_channels=4", "model.embed_dim=4", "model.resolution=16", "model.norm_groups=4",
            "data.image_size=16", "train.global_batch_size=8", "train.log_every=1", "train.lr=0.002",
            f"data.image_folder={work / 'digits'}", f"train.output_dir={work / 'tok'}"]
gan = ["loss.disc_start=2", "loss.disc_num_layers=1", "train.ema_decay=0.9", "train.ckpt_every=3",
       "train.exp_name=gan", "train.micro_batch_size=4"]
train_tok(str(kit / "configs/tokenizer/digits_f4.yaml"), set=tiny_tok + ["train.max_steps=6", "train.exp_name=plain"])
train_tok(str(kit / "configs/tokenizer/digits_f4.yaml"), set=tiny_tok + gan + ["train.max_steps=6"])
for exp in ("plain", "gan"):
    for p in sorted((work / "tok" / exp / "checkpoints").glob("*.pt")):
        obj = torch.load(p, map_location="cpu", weights_only=True)
        res[f"tok_{exp}_{p.name}"] = {k: tensors_sha(obj[k]) for k in ("model", "ema", "opt", "step", "data_order")}
    res[f"tok_{exp}_safetensors"] = sha(work / "tok" / exp / "tokenizer.safetensors")
    rows = [json.loads(l) for l in (work / "tok" / exp / "log.jsonl").read_text().splitlines()]
    res[f"tok_{exp}_log"] = [{k: v for k, v in r.items() if k in ("step", "loss", "rec_loss", "kl_loss", "g_loss",
                                                                  "d_weight", "disc_loss", "lr")} for r in rows]
out_json.write_text(json.dumps(res, indent=1, sort_keys=True))
print("wrote", out_json)
if compare is not None:
    old = json.loads(compare.read_text())
    rng_only = {k for k in res if k.startswith("ckpt_") and k.endswith("_bytes")}
    diff = [k for k in res if k not in rng_only and (old.get(k) != res[k] if not k.startswith("ckpt_")
            else {a: b for a, b in res[k].items() if a != "rng"} != {a: b for a, b in old.get(k, {}).items() if a != "rng"})]
    print("identical (rng states aside)" if not diff else f"DIFFERENT: {diff}")
    sys.exit(1 if diff else 0)
