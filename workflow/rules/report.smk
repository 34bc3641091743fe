TABLE = ["md", "csv", "tex"]


rule table_main:
    input:
        finetune_outputs(),
    output:
        report(f"{R}/tables/main.md", caption="../report/table1.rst", category="Tables"),
        f"{R}/tables/main.csv",
        f"{R}/tables/main.tex",
    params:
        out=f"{R}/tables",
    log:
        f"{R}/logs/report/table1.log",
    shell:
        "mop report table1 --runs {input} --out {params.out} 2> {log:q}"


rule table_kgs:
    input:
        expand(f"{R}/kg/{{kg}}/stats.json", kg=list(config["kgs"])),
    output:
        report(f"{R}/tables/table2_kgs.md", caption="../report/table2.rst", category="Tables"),
        f"{R}/tables/table2_kgs.csv",
        f"{R}/tables/table2_kgs.tex",
    params:
        out=f"{R}/tables",
    log:
        f"{R}/logs/report/table2.log",
    shell:
        "mop report table2 --stats {input} --out {params.out} 2> {log:q}"


rule table_mixtures:
    input:
        base_metrics() + mop_metrics(),
    output:
        report(f"{R}/tables/table6_mixtures.md", caption="../report/table6.rst", category="Tables"),
        f"{R}/tables/table6_mixtures.csv",
        f"{R}/tables/table6_mixtures.tex",
    params:
        out=f"{R}/tables",
    log:
        f"{R}/logs/report/table6.log",
    shell:
        "mop report table6 --runs {input} --out {params.out} 2> {log:q}"


rule table_shuffle:
    input:
        partition_stats(),
    output:
        report(f"{R}/tables/table3_shuffle.md", caption="../report/table3.rst", category="Tables"),
        f"{R}/tables/table3_shuffle.csv",
        f"{R}/tables/table3_shuffle.tex",
    params:
        out=f"{R}/tables",
    log:
        f"{R}/logs/report/table3.log",
    shell:
        "mop report table3 --stats {input} --out {params.out} 2> {log:q}"


rule table_partitions:
    input:
        runs=mop_metrics(ks=list(dict.fromkeys(config["partition"]["k"]))),
        stats=partition_stats(schemes=["metis"]),
    output:
        report(f"{R}/tables/table4_partitions.md", caption="../report/table4.rst",
               category="Tables"),
        f"{R}/tables/table4_partitions.csv",
        f"{R}/tables/table4_partitions.tex",
    params:
        out=f"{R}/tables",
    log:
        f"{R}/logs/report/table4.log",
    shell:
        "mop report table4 --runs {input.runs} --stats {input.stats} --out {params.out}"
        " 2> {log:q}"


rule figure_shuffle:
    input:
        mop_metrics(schemes=partition_schemes()),
    output:
        report(f"{R}/figures/figure3_shuffle.png", caption="../report/figure3.rst",
               category="Figures"),
        f"{R}/figures/figure3_shuffle.pdf",
    params:
        out=f"{R}/figures/figure3_shuffle",
    log:
        f"{R}/logs/report/figure3.log",
    shell:
        "mop report figure3 --runs {input} --out {params.out} 2> {log:q}"


rule table_probe_baselines:
    input:
        [p.replace("metrics.json", "baselines.json") for p in probe_control_metrics()
         if "/zeroshot/" in p],
    output:
        report(f"{R}/tables/probe_baselines.md", caption="../report/probe.rst",
               category="Tables"),
        f"{R}/tables/probe_baselines.csv",
        f"{R}/tables/probe_baselines.tex",
    params:
        out=f"{R}/tables",
    log:
        f"{R}/logs/report/probe_baselines.log",
    shell:
        "mop report probe-baselines --stats {input} --out {params.out} 2> {log:q}"


rule figure_adapters:
    input:
        adapters=adapter_metrics(),
        single=single_adapter_metrics(),
    output:
        report(f"{R}/figures/figure2_adapters.png", caption="../report/figure2.rst",
               category="Figures"),
        f"{R}/figures/figure2_adapters.pdf",
    params:
        out=f"{R}/figures/figure2_adapters",
    log:
        f"{R}/logs/report/figure2.log",
    shell:
        "mop report figure2 --adapters {input.adapters} --single-runs {input.single}"
        " --out {params.out} 2> {log:q}"


rule figure_mixture:
    input:
        first_mixture_file(),
    output:
        report(f"{R}/figures/figure4_mixture.png", caption="../report/figure4.rst",
               category="Figures"),
        f"{R}/figures/figure4_mixture.pdf",
    params:
        out=f"{R}/figures/figure4_mixture",
    log:
        f"{R}/logs/report/figure4.log",
    shell:
        "mop report figure4 --mixture {input} --out {params.out} 2> {log:q}"


rule table_single_adapters:
    input:
        single_adapter_metrics() + analysis_base_metrics(),
    output:
        report(f"{R}/tables/single_adapters.md", caption="../report/single_adapters.rst",
               category="Tables"),
        f"{R}/tables/single_adapters.csv",
        f"{R}/tables/single_adapters.tex",
    params:
        out=f"{R}/tables",
    log:
        f"{R}/logs/report/single_adapters.log",
    shell:
        "mop report single-adapters --runs {input} --out {params.out} 2> {log:q}"


rule table_subsets:
    input:
        selections=lambda w: subset_selections(w.task),
        runs=lambda w: single_adapter_metrics(w.task) + subset_metrics(w.task)
        + analysis_base_metrics(w.task),
    output:
        report(f"{R}/tables/subsets_{{task}}.md", caption="../report/subsets.rst",
               category="Tables"),
        f"{R}/tables/subsets_{{task}}.csv",
        f"{R}/tables/subsets_{{task}}.tex",
    params:
        out=f"{R}/tables",
    log:
        f"{R}/logs/report/subsets_{{task}}.log",
    shell:
        "mop report subsets --runs {input.runs} --stats {input.selections}"
        " --name subsets_{wildcards.task} --out {params.out} 2> {log:q}"


rule figure_topics:
    input:
        mixture=first_mixture_file(),
        terms=f"{topics_dir(mop_kgs()[0])}/terms.csv",
        groups=f"{topics_dir(mop_kgs()[0])}/groups.csv",
    output:
        report(f"{R}/figures/figure4_topics.png", caption="../report/figure4_topics.rst",
               category="Figures"),
        f"{R}/figures/figure4_topics.pdf",
    params:
        out=f"{R}/figures/figure4_topics",
    log:
        f"{R}/logs/report/figure4_topics.log",
    shell:
        "mop report figure-topics --terms {input.terms} --groups {input.groups}"
        " --mixture {input.mixture} --out {params.out} 2> {log:q}"


rule publish:
    input:
        report_outputs(),
    output:
        f"{R}/report/run.json",
    params:
        experiment=config["experiment"],
    log:
        f"{R}/logs/report/publish.log",
    shell:
        "mop publish --results {R} --experiment {params.experiment} --artifacts {input}"
        " 2> {log:q}"
