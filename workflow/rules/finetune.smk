# Downstream tasks: prepared splits, their tokens, and the fine-tuning runs of every method.


rule task_probe:
    input:
        entities=lambda w: PLAN.path(Run("kg", kg=config["tasks"]["probe"]["kg"]),
                                     "entities.parquet"),
        membership=lambda w: PLAN.path(
            Run("partition", kg=config["tasks"]["probe"]["kg"], k=config["tasks"]["probe"]["k"],
                scheme="metis"),
            "membership.parquet",
        ),
    output:
        multiext(
            pattern("task", "", R) + "/",
            "train.parquet",
            "dev.parquet",
            "test.parquet",
            "summary.json",
        ),
    wildcard_constraints:
        task="probe",
    params:
        options=lambda w: as_json(PLAN.task_data_options("probe")),
        kg=lambda w, input: os.path.dirname(input.entities),
        partition=lambda w, input: os.path.dirname(input.membership),
        out=lambda w, output: os.path.dirname(output[0]),
    conda:
        "../envs/mop.yaml"
    log:
        log_pattern("task", R),
    shell:
        "mop task --kg {params.kg} --partition {params.partition}"
        " --options {params.options:q} --out {params.out} 2> {log:q}"


rule task_data:
    input:
        lambda w: task_files(w.task),
    output:
        multiext(
            pattern("task", "", R) + "/",
            "train.parquet",
            "dev.parquet",
            "test.parquet",
            "summary.json",
        ),
    wildcard_constraints:
        task="hoc|bioasq7b|bioasq8b|mednli|medqa",
    params:
        options=lambda w: as_json(PLAN.task_data_options(w.task)),
        out=lambda w, output: os.path.dirname(output[-1]),
    conda:
        "../envs/mop.yaml"
    log:
        log_pattern("task", R),
    shell:
        "mop task --options {params.options:q} --out {params.out} 2> {log:q}"


use rule task_data as task_pubmedqa with:
    output:
        expand(
            pattern("task", "fold{i}/{split}.parquet", R),
            i=range(10),
            split=["train", "dev", "test"],
            allow_missing=True,
        ),
        summary=pattern("task", "summary.json", R),
    wildcard_constraints:
        task="pubmedqa",
    params:
        options=lambda w: as_json(PLAN.task_data_options("pubmedqa")),
        out=lambda w, output: os.path.dirname(output.summary),


rule encode:
    input:
        pattern("task", "summary.json", R),
    output:
        pattern("encoded", "encoding.json", R),
    params:
        models=models_json,
        task_dir=lambda w, input: os.path.dirname(input[0]),
        out=lambda w, output: os.path.dirname(output[0]),
    resources:
        **stage_resources("tokenize"),
    conda:
        "../envs/mop.yaml"
    log:
        log_pattern("encoded", R),
    shell:
        "mop encode --task-dir {params.task_dir} --models {params.models:q}"
        " --out {params.out} 2> {log:q}"


FINETUNE = ["metrics.json", "predictions.parquet"]


def finetune_inputs(w):
    """Every run reads its task's splits and their tokens for its model's tokenizer."""
    return {
        "task": PLAN.path(Run("task", task=w.task), "summary.json"),
        "encoded": PLAN.path(PLAN.encoded(w.task, w.model), "encoding.json"),
    }


rule finetune_base:
    input:
        unpack(finetune_inputs),
    output:
        multiext(pattern("base", "", R) + "/", *FINETUNE),
    params:
        options=lambda w: as_json(PLAN.finetune_options(run_of("base")(w))),
        models=models_json,
        task_dir=lambda w: PLAN.task_folder(w.task, w.seed),
        encoded=lambda w: PLAN.encoded_folder(w.task, w.model, w.seed),
        adapters="",
        out=lambda w, output: os.path.dirname(output[0]),
    threads: res("finetune", "threads")
    resources:
        **stage_resources("finetune"),
    conda:
        "../envs/mop.yaml"
    log:
        log_pattern("base", R),
    shell:
        "mop finetune --task-dir {params.task_dir} --encoded {params.encoded} {params.adapters}"
        " --models {params.models:q} --options {params.options:q} --threads {threads}"
        " --out {params.out} 2> {log:q}"


use rule finetune_base as finetune_mop with:
    input:
        unpack(finetune_inputs),
        adapters=adapter_files,
    output:
        multiext(pattern("mop", "", R) + "/", *FINETUNE, "mixture.parquet"),
    params:
        options=lambda w: as_json(PLAN.finetune_options(run_of("mop")(w))),
        adapters=lambda w, input: f"--adapters {folders(input.adapters)}",
    log:
        log_pattern("mop", R),


use rule finetune_mop as finetune_oracle with:
    output:
        multiext(pattern("oracle", "", R) + "/", *FINETUNE),
    params:
        options=lambda w: as_json(PLAN.finetune_options(run_of("oracle")(w))),
    log:
        log_pattern("oracle", R),


use rule finetune_mop as finetune_adapter with:
    input:
        unpack(finetune_inputs),
        adapters=lambda w: adapter_files(w)[int(w.part) : int(w.part) + 1],
    output:
        multiext(pattern("single", "", R) + "/", *FINETUNE),
    params:
        options=lambda w: as_json(PLAN.finetune_options(run_of("single")(w))),
    log:
        log_pattern("single", R),


use rule finetune_mop as finetune_subset with:
    input:
        unpack(finetune_inputs),
        selection=lambda w: checkpoints.select_subsets.get(
            task=w.task, model=w.model, kg=w.kg, k=w.k, scheme="metis"
        ).output[0],
        adapters=subset_adapter_files,
    output:
        multiext(pattern("subset", "", R) + "/", *FINETUNE, "mixture.parquet"),
    params:
        options=lambda w: as_json(PLAN.finetune_options(run_of("subset")(w))),
    log:
        log_pattern("subset", R),


rule probe_controls:
    input:
        task=pattern("task", "summary.json", R),
        kg=pattern("kg", "entities.parquet", R),
        membership=pattern("partition", "membership.parquet", R),
        adapters=adapter_files,
    output:
        multiext(pattern("zeroshot", "", R) + "/", "metrics.json", "baselines.json"),
    params:
        options=lambda w: as_json({"relation": config["tasks"]["probe"]["relation"]}),
        models=models_json,
        kg=lambda w, input: os.path.dirname(input.kg),
        partition=lambda w, input: os.path.dirname(input.membership),
        task_dir=lambda w, input: os.path.dirname(input.task),
        adapters=lambda w, input: " ".join(
            os.path.dirname(os.path.dirname(a)) for a in input.adapters
        ),
        out=lambda w, output: os.path.dirname(output[0]),
    threads: res("finetune", "threads")
    resources:
        **stage_resources("finetune"),
    conda:
        "../envs/mop.yaml"
    log:
        log_pattern("zeroshot", R),
    shell:
        "mop probe-controls --task-dir {params.task_dir} --kg {params.kg}"
        " --partition {params.partition} --adapters {params.adapters}"
        " --models {params.models:q} --options {params.options:q} --threads {threads}"
        " --out {params.out} 2> {log:q}"
