# The DiffusionNFT baseline: K=1 (no perturbation, no Phase I), G=24 noises per prompt, GenEval reward.
# Same objective, schedule and hyperparameters as the E²PO presets; only the group changes.
# Match max_steps to the E²PO run you compare against (the paper fixes total optimization steps).
weights = "/models/stable-diffusion-3.5-medium"
use_t5 = True
max_sequence_length = 128                 # T5 tokens: DiffusionNFT trains and evaluates with 128
train_prompts = "data/geneval/train_metadata.jsonl"   # GenEval jsonl from Flow-GRPO's dataset/geneval/ (README)
eval_prompts = "data/geneval/test_metadata.jsonl"
balance_tags = False                      # uniform over prompts, as Flow-GRPO / DiffusionNFT sample GenEval
eval_num_prompts = 0
eval_num_images = 1
eval_sample_steps = 40                    # inference steps, Table 3
reward = "geneval"
reward_paths = {}
reward_module = ""                        # only reward.py's own rewards (not the toy world's)
eval_reward = ""                          # = reward
resolution = 512
delta_max = 0.05                          # ‖δ‖max, Table 3 (the world's default is scaled to its tiny CLIP)
emb_steps = 300                           # T_emb, Table 3 (the world needs only 50)
num_variants = 1
num_seeds = 24
prompts_per_step = 48                     # DiffusionNFT: 48 groups × 24 per epoch
rollout_micro_batch = 12
train_micro_batch = 9
learning_rate = 3e-4                      # Table 3
timestep_fraction = 0.99                  # DiffusionNFT
max_steps = 850
eval_every = 50
save_every = 50
log_images_every = 50
dtype = "float16"                         # autocast with a GradScaler; the MMDiT keeps float32 weights
grad_checkpointing = True
out_dir = "out-nft-baseline"
