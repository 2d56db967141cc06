#!/bin/bash
# Session 50: DINOv2 white box seeds 1-2; black-box transfer at 512 px (seed 0); low preset seeds 1-2.
cd /work/main
COMMON="--dataset emoji-groups --kind triples --limit 240 --on test --limit-test 200 --final-epoch-only --no-split-controls --results benchmarks/results/lab-real-size.json"
A="lora:epochs=8,lr=1e-3,batch_size=8"
echo "== dino wb seeds 0-2 $(date)"
.venv/bin/mmguard lab --method wrong-target --set surrogates=smolvlm-lite-c --attacker smolvlm-lite-c:$A --seeds 0,1,2 $COMMON --out runs/lab/rs-wt-dino --name "emoji-groups (512 px)/wrong-target on smolvlm-lite-c, attacker smolvlm-lite-c (DINOv2 white box)"
echo "== eff release -> resnet seed 0 $(date)"
.venv/bin/mmguard lab --method wrong-target --attacker smolvlm-lite-d:$A --seeds 0 $COMMON --out runs/lab/rs-wt-eff --name "emoji-groups (512 px)/wrong-target (the triples default), attacker smolvlm-lite-d (ResNet-50, black box) seed 0"
echo "== eff release -> dino seed 0 $(date)"
.venv/bin/mmguard lab --method wrong-target --attacker smolvlm-lite-c:$A --seeds 0 $COMMON --out runs/lab/rs-wt-eff --name "emoji-groups (512 px)/wrong-target (the triples default), attacker smolvlm-lite-c (DINOv2, black box) seed 0"
echo "== dino release -> eff seed 0 $(date)"
.venv/bin/mmguard lab --method wrong-target --set surrogates=smolvlm-lite-c --attacker smolvlm-lite:$A --seeds 0 $COMMON --out runs/lab/rs-wt-dino --name "emoji-groups (512 px)/wrong-target on smolvlm-lite-c, attacker smolvlm-lite (EfficientNet, black box) seed 0"
echo "== dino release -> resnet seed 0 $(date)"
.venv/bin/mmguard lab --method wrong-target --set surrogates=smolvlm-lite-c --attacker smolvlm-lite-d:$A --seeds 0 $COMMON --out runs/lab/rs-wt-dino --name "emoji-groups (512 px)/wrong-target on smolvlm-lite-c, attacker smolvlm-lite-d (ResNet-50, black box) seed 0"

echo "== low preset seeds 0-2 $(date)"
.venv/bin/mmguard lab --method wrong-target --eps 4/255 --set pgd_steps=20 --attacker smolvlm-lite:$A --seeds 0,1,2 $COMMON --out runs/lab/rs-wt-eff-low --name "emoji-groups (512 px)/wrong-target --strength low (4/255, 20 steps), attacker smolvlm-lite (white box), test split"
echo "== done $(date)"
