# E²PO, Human Preference Alignment (paper App. B.1): PickScore reward, G=8, K=3, 750 steps.
#   torchrun --nproc_per_node=8 train.py config/pickscore_k3.py --weights=/models/stable-diffusion-3.5-medium \
#       --reward_paths="{'pickscore': '/models/PickScore_v1'}"
# 48 prompt groups per step, as DiffusionNFT (48 × 24 = 1152 samples).
weights = "/models/stable-diffusion-3.5-medium"
use_t5 = True
max_sequence_length = 128                 # T5 tokens: DiffusionNFT trains and evaluates with 128
train_prompts = "data/pickscore/train.txt"   # one prompt a line, from Flow-GRPO's dataset/pickscore/ (README)
eval_prompts = "data/pickscore/test.txt"
eval_num_prompts = 0
eval_num_images = 1
eval_sample_steps = 40                    # inference steps, Table 3
reward = "pickscore"
reward_paths = {}
reward_module = ""                        # only reward.py's own rewards (not the toy world's)
eval_reward = ""                          # = reward
resolution = 512
delta_max = 0.05                          # ‖δ‖max, Table 3 (the world's default is scaled to its tiny CLIP)
emb_steps = 300                           # T_emb, Table 3 (the world needs only 50)
num_variants = 3
num_seeds = 8
prompts_per_step = 48
rollout_micro_batch = 12
train_micro_batch = 9
learning_rate = 3e-4                      # Table 3
timestep_fraction = 0.99                  # DiffusionNFT
max_steps = 750
eval_every = 50
save_every = 50
log_images_every = 50
dtype = "float16"                         # autocast with a GradScaler; the MMDiT keeps float32 weights
grad_checkpointing = True
out_dir = "out-pickscore-k3"
