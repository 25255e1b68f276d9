# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv and install the project.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
# The sample corpus is small: shards of 64 samples (so several run in parallel) and a benchmark scaled to its chapters.
DEMO_ARGS ?= --max-samples 64 --bench-chapters 2 --bench-refs 10 --bench-bw 10 --bench-max-series-fraction 0.25
EXTRAS ?= cpu,dev

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# bitsandbytes (the bnb extra, for --use_8bit_adam) goes into a folder of its own, not into the venv: where peft can
# import it, every peft import loads it, and its CPU backend then looks for a 4-bit kernel on the kernel hub and
# prints a warning in every process. The 8-bit AdamW numerics test runs it in a subprocess from this folder.
# BNB_SPEC is the bnb extra's requirement in pyproject.toml.
BNB_TARGET := $(VENV)/bnb
BNB_STAMP := $(BNB_TARGET)/.installed
BNB_SPEC ?= bitsandbytes>=0.45

$(BNB_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(BNB_TARGET) "$(BNB_SPEC)"
	touch $(BNB_STAMP)

# After the data pipeline, a smoke run of the whole loop on tiny random models (no weights are downloaded): a few
# steps of each trainer, then colorize + evaluate over the benchmark folder, for the SD1.5 family (halftone style)
# and the line-art PixArt family (sketch style). It shows the loop runs end to end; tiny random models colour
# nothing well, so the scores only say that every piece is wired.
LOOP_STEPS ?= 4
# The loop runs at a quarter of the data's 512x800 so that a CPU colours the benchmark in about a minute.
LOOP_SIZE ?= 128x192
demo: $(STAMP)
	$(PY) -m jobs.pipeline --generate-sample $(DEMO_DIR)/corpus --output $(DEMO_DIR)/data --report $(DEMO_DIR)/report \
		--encoder weightfree --renderer halftone $(DEMO_ARGS)
	@echo "== smoke run of the loop on tiny random models (not a trained model)"
	$(PY) -m model.tiny $(DEMO_DIR)/tiny-sd15
	$(PY) -m training.train_icp --pretrained_model_name_or_path $(DEMO_DIR)/tiny-sd15 --data $(DEMO_DIR)/data \
		--output_dir $(DEMO_DIR)/icp --max_train_steps $(LOOP_STEPS) --checkpointing_steps $(LOOP_STEPS) \
		--validation_steps $(LOOP_STEPS) --validation_inference_steps 2 --learning_rate 1e-4 --dataloader_num_workers 0 \
		--resolution $(LOOP_SIZE) --resume_from_checkpoint latest
	$(PY) -m training.train_gsrp --pretrained_model_name_or_path $(DEMO_DIR)/tiny-sd15 --data $(DEMO_DIR)/data \
		--output_dir $(DEMO_DIR)/gsrp --max_train_steps $(LOOP_STEPS) --checkpointing_steps $(LOOP_STEPS) \
		--validation_steps $(LOOP_STEPS) --crop_size 256x256 --resume_from_checkpoint latest
	$(PY) -m jobs.colorize --benchmark $(DEMO_DIR)/data/benchmark --style halftone --output $(DEMO_DIR)/colorized \
		--icp $(DEMO_DIR)/icp --gsrp $(DEMO_DIR)/gsrp --sd15 $(DEMO_DIR)/tiny-sd15 --encoder weightfree \
		--steps 2 --size $(LOOP_SIZE) --local
	$(PY) -m jobs.evaluate --pred $(DEMO_DIR)/colorized --truth $(DEMO_DIR)/data/benchmark --fid-features weightfree \
		--clip-encoder weightfree --ssim-precision float32
	@echo "== the line-art family, sketch style: a tiny random PixArt trained a few steps on the shards' sketch.png"
	$(PY) -m model.tiny_pixart $(DEMO_DIR)/tiny-pixart
	$(PY) -m model.text_cache $(DEMO_DIR)/tiny-pixart $(DEMO_DIR)/tiny-pixart-manga.safetensors --prompt manga
	$(PY) -m training.train_pixart_icp --pretrained_model_name_or_path $(DEMO_DIR)/tiny-pixart \
		--text_cache $(DEMO_DIR)/tiny-pixart-manga.safetensors --data $(DEMO_DIR)/data --output_dir $(DEMO_DIR)/pixart-icp \
		--bw_variant sketch --max_train_steps $(LOOP_STEPS) --checkpointing_steps $(LOOP_STEPS) --validation_steps 0 \
		--lora_rank 8 --lora_alpha 8 --learning_rate 1e-4 --dataloader_num_workers 0 --resolution $(LOOP_SIZE) \
		--resume_from_checkpoint latest
	$(PY) -m jobs.colorize --benchmark $(DEMO_DIR)/data/benchmark --style sketch --output $(DEMO_DIR)/colorized-sketch \
		--icp $(DEMO_DIR)/pixart-icp --encoder weightfree --steps 2 --size $(LOOP_SIZE) --local
	$(PY) -m jobs.evaluate --pred $(DEMO_DIR)/colorized-sketch --truth $(DEMO_DIR)/data/benchmark --ssim-precision float32
	@echo "== demo done: data in $(DEMO_DIR)/data, report in $(DEMO_DIR)/report, loop smoke runs in $(DEMO_DIR)/{icp,gsrp,colorized} and $(DEMO_DIR)/{pixart-icp,colorized-sketch}"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(STAMP) $(BNB_STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider --timeout 900

bench: $(STAMP)
	for script in bench/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
