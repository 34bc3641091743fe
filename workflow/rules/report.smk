rule report:
    input:
        finetune_outputs(),
    output:
        md=f"{R}/tables/main.md",
        csv=f"{R}/tables/main.csv",
    params:
        out=f"{R}/tables",
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/report.log",
    shell:
        "mop report --results {R} --out {params.out} 2> {log:q}"


rule table3:
    input:
        partition_stats(),
    output:
        md=f"{R}/tables/table3.md",
        csv=f"{R}/tables/table3.csv",
        tex=f"{R}/tables/table3.tex",
    params:
        out=f"{R}/tables",
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/table3.log",
    shell:
        "mop partition-table --stats {input:q} --out {params.out} 2> {log:q}"
