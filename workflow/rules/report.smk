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
