# The default world: E²PO on the embedded shapes world (data/shapes/), CPU, minutes.
# These are exactly the defaults at the top of train.py: `python train.py` == `python train.py config/shapes.py`.
weights = ""                              # "" = the world's data/shapes/sd3_tiny (data/shapes/pretrain.py)
use_t5 = False                            # the tiny world has CLIP-shaped encoders only
max_sequence_length = 0                   # T5 tokens: the pipeline's own (the world's e2po.json: 8 zeros)
train_prompts = "data/shapes/train.jsonl"
balance_tags = True                       # each GenEval tag equally often (the train split is 83 % color_attr)
eval_prompts = "data/shapes/test.jsonl"
eval_num_prompts = 0                      # all 47 held-out prompts ...
eval_num_images = 16                      # ... × 16 images, the same noise for every run
eval_sample_steps = 20
reward = "shapes"                         # train: the world's GenEval partial score (the paper's reward)
reward_paths = {}
reward_module = "data.shapes.world"       # registers the world's rewards (shapes, shapes_soft)
eval_reward = "shapes"                    # evaluate: the world's GenEval scoring (partial and strict)
resolution = 0                            # the pipeline's native size (the world: 64)
delta_max = 0.04                          # ‖δ‖max for the tiny CLIP: variants near cos μ (paper: 0.05)
emb_steps = 50                            # T_emb (paper: 300; the ‖δ‖max bound binds within 50 steps here)
num_variants = 4                          # K
num_seeds = 2                             # G
prompts_per_step = 8
rollout_micro_batch = 64
train_micro_batch = 64
learning_rate = 1e-3                      # 40 steps must move the policy (the SD3.5 presets: 3e-4)
timestep_fraction = 0.99                  # 9 of the 10 rollout σ per sample, as DiffusionNFT
max_steps = 40                            # ≤ 10 min on 2 CPU cores
eval_every = 40
save_every = 20
log_images_every = 20
out_dir = "out"
