# E²PO, High-Exploration Compositional Generation (paper App. B.1): GenEval reward, G=4, K=12, 300 steps.
#   torchrun --nproc_per_node=8 train.py config/geneval_k12.py --weights=/models/stable-diffusion-3.5-medium \
#       --reward_paths="{'geneval': '/models/geneval'}"
# 24 prompts × 48 samples = 1152 samples per step, DiffusionNFT's per-epoch sample count (48 groups × 24).
weights = "/models/stable-diffusion-3.5-medium"   # pipeline root or sd3.5_medium.safetensors
use_t5 = True
max_sequence_length = 256                 # T5 tokens, as diffusers
train_prompts = "data/geneval/train_metadata.jsonl"   # DiffusionNFT's dataset/geneval files (GenEval jsonl)
eval_prompts = "data/geneval/test_metadata.jsonl"
eval_num_prompts = 0                      # all
reward = "geneval"
reward_paths = {}                         # set on the command line: the detector / CLIP folders reward.py names
resolution = 512
delta_max = 0.05                          # ‖δ‖max, Table 3 (the world's default is scaled to its tiny CLIP)
num_variants = 12
num_seeds = 4
prompts_per_step = 24                     # 3 per GPU on 8 GPUs
rollout_micro_batch = 16
train_micro_batch = 9                     # DiffusionNFT's per-GPU training batch
learning_rate = 3e-4                      # Table 3
max_steps = 300
eval_every = 25
save_every = 25
log_images_every = 25
dtype = "float16"
grad_checkpointing = True
out_dir = "out-geneval-k12"
