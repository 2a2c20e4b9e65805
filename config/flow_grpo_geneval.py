# Flow-GRPO on GenEval (yifan123/flow_grpo config/grpo.py: geneval_sd3), SD3.5-M, LoRA r32/α64.
#   torchrun --nproc_per_node=8 train.py config/flow_grpo_geneval.py --weights=/models/stable-diffusion-3.5-medium \
#       --reward_paths="{'geneval': '/models/geneval'}"
# 48 prompts × 24 images = 1152 samples per step, as the reference's epoch (and DiffusionNFT's). Departure: no CFG
# (the reference samples and trains with guidance 4.5; its *_fast_nocfg presets, DiffusionNFT and E²PO use none).
method = "flow_grpo"
weights = "/models/stable-diffusion-3.5-medium"
use_t5 = True
max_sequence_length = 128                 # T5 tokens, as the reference
train_prompts = "data/geneval/train_metadata.jsonl"   # GenEval jsonl from Flow-GRPO's dataset/geneval/ (README)
eval_prompts = "data/geneval/test_metadata.jsonl"
balance_tags = False                      # uniform over prompts, as Flow-GRPO / DiffusionNFT sample GenEval
eval_num_prompts = 0
eval_num_images = 1
eval_sample_steps = 40                    # sample.eval_num_steps
reward = "geneval"
reward_paths = {}
reward_module = ""                        # only reward.py's own rewards (not the toy world's)
eval_reward = ""                          # = reward
resolution = 512
num_variants = 1                          # no E²PO variants (grpo_variants=True would allow them)
num_seeds = 24                            # sample.num_image_per_prompt
prompts_per_step = 48                     # 6 per GPU on 8 GPUs
train_sample_steps = 10                   # sample.num_steps
timestep_fraction = 0.99                  # train on 9 of the 10 steps
sde_eta = 0.7                             # sample.noise_level
grpo_clip_range = 1e-4                    # train.clip_range
grpo_kl_beta = 0.04                       # train.beta (GenEval)
grpo_updates = 2                          # gradient_accumulation_steps = num_batches_per_epoch // 2: two steps an epoch
adv_clip_max = 5.0                        # train.adv_clip_max
global_std = True                         # sample.global_std
learning_rate = 3e-4                      # train.learning_rate
weight_decay = 1e-4
grad_clip = 1.0                           # train.max_grad_norm
use_ema = True                            # train.ema (decay 0.9)
rollout_micro_batch = 12
train_micro_batch = 9                     # train.batch_size (transitions per training forward)
max_steps = 850                           # the reference stops by hand; match the run you compare against
eval_every = 50
save_every = 50
log_images_every = 50
dtype = "float16"                         # mixed_precision fp16; the MMDiT keeps float32 weights
grad_checkpointing = True
out_dir = "out-flow-grpo-geneval"
