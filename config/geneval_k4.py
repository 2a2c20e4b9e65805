# E²PO, Efficient Compositional Generation (paper App. B.1): GenEval reward, G=2, K=4, 850 steps.
#   torchrun --nproc_per_node=8 train.py config/geneval_k4.py --weights=/models/stable-diffusion-3.5-medium \
#       --reward_paths="{'geneval': '/models/geneval'}"
# 48 prompt groups per step, as DiffusionNFT (48 × 8 = 384 samples).
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
num_variants = 4
num_seeds = 2
prompts_per_step = 48                     # 6 per GPU on 8 GPUs
rollout_micro_batch = 8
train_micro_batch = 8
learning_rate = 3e-4                      # Table 3
timestep_fraction = 0.99                  # DiffusionNFT
max_steps = 850
eval_every = 50
save_every = 50
log_images_every = 50
dtype = "float16"                         # autocast with a GradScaler; the MMDiT keeps float32 weights
grad_checkpointing = True
out_dir = "out-geneval-k4"
