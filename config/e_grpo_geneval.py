# E-GRPO (arXiv 2601.00423) on GenEval (E²PO's Table 1 reward), SD3.5-M, LoRA r32/α64. The paper's settings
# (FLUX.1-dev, human preference rewards): T = 16 sampling steps, noise level a = 0.7, entropy threshold τ = 2.2,
# branch points in the first 8 steps, lr 2e-6, 300 iterations. With τ read as a bound on 2πe·a²·σ/(1 − σ)·Δσ
# (train.py), the plan on SD3's shift-3 grid is [(0,1), (1,1), (2,1), (3,1), (4,1), (5,2), (7,2)]: 7 active steps,
# 2 of them merged.
#   torchrun --nproc_per_node=8 train.py config/e_grpo_geneval.py --weights=/models/stable-diffusion-3.5-medium \
#       --reward_paths="{'geneval': '/models/geneval'}"
# Not in the material we have (the paper's text here is its abstract; its code does not run), so taken from
# Flow-GRPO's SD3.5 presets: G, the prompt batch, β, ε, A_max, LoRA, EMA. 16 prompts × 7 steps × G = 8 = 896 images
# per step (Flow-GRPO's: 1152). lr 2e-6 is the paper's for FLUX; DiffusionNFT and Flow-GRPO use 3e-4 for this LoRA.
method = "e_grpo"
weights = "/models/stable-diffusion-3.5-medium"
use_t5 = True
max_sequence_length = 128
train_prompts = "data/geneval/train_metadata.jsonl"   # GenEval jsonl from Flow-GRPO's dataset/geneval/ (README)
eval_prompts = "data/geneval/test_metadata.jsonl"
balance_tags = False                      # uniform over prompts, as Flow-GRPO / DiffusionNFT sample GenEval
eval_num_prompts = 0
eval_num_images = 1
eval_sample_steps = 40
reward = "geneval"
reward_paths = {}
reward_module = ""
eval_reward = ""
resolution = 512
num_variants = 1
num_seeds = 8                             # G branches per active step (ours)
prompts_per_step = 16                     # 2 per GPU on 8 GPUs (ours)
train_sample_steps = 16                   # T (paper)
timestep_fraction = 0.5                   # branch points in the first 8 of 16 steps (paper)
sde_eta = 0.7                             # a (paper)
egrpo_tau = 2.2                           # τ (paper)
egrpo_branch_steps = 0                    # every active step
global_std = False                        # advantages normalised within each (prompt, step) group (paper)
grpo_clip_range = 1e-4                    # Flow-GRPO's
grpo_kl_beta = 0.04                       # Flow-GRPO's for GenEval
grpo_updates = 1
adv_clip_max = 5.0
learning_rate = 2e-6                      # paper (FLUX.1-dev)
weight_decay = 1e-4
grad_clip = 1.0
use_ema = True
rollout_micro_batch = 8
train_micro_batch = 8
max_steps = 300                           # paper
eval_every = 25
save_every = 25
log_images_every = 25
dtype = "float16"
grad_checkpointing = True
out_dir = "out-e-grpo-geneval"
