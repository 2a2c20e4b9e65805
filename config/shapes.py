# The default world: E²PO on the embedded shapes world (data/shapes/), CPU, minutes.
# These are exactly the defaults at the top of train.py: `python train.py` == `python train.py config/shapes.py`.
weights = ""                              # "" = data/shapes/sd3_tiny (built by data/shapes/pretrain.py)
use_t5 = False                            # the tiny world has CLIP-shaped encoders only
max_sequence_length = 8                   # the zero "T5" part the tiny model was pretrained with
train_prompts = "data/shapes/train.jsonl"
eval_prompts = "data/shapes/test.jsonl"
eval_num_prompts = 64
reward = "shapes"                         # GenEval scoring with the world's numpy detector
reward_paths = {}
resolution = 64                           # the world renders 64² images (data/shapes/world.py SIZE)
delta_max = 0.025                         # ‖δ‖max scaled to the tiny CLIP (paper: 0.05)
num_variants = 4                          # K
num_seeds = 2                             # G
prompts_per_step = 8
rollout_micro_batch = 8
train_micro_batch = 4
learning_rate = 2e-3                       # 40 steps must move the policy (the SD3.5 presets: 3e-4)
max_steps = 40
eval_every = 10
save_every = 10
log_images_every = 10
out_dir = "out"
