# One rule per report of the registry (mop/report/registry.py): tables and figures from the
# runs they read, each in `snakemake --report` with its caption; then the MLflow report run.
for name, rep in REPORTS.items():

    rule:
        name:
            f"report_{name.replace('-', '_')}"
        input:
            unpack(lambda w, rep=rep: rep.inputs(PLAN, dict(w.items()))),
        output:
            report(
                rep.files(R)[0],
                caption=f"../report/{rep.caption}.rst",
                category=rep.category,
            ),
            *rep.files(R)[1:],
        log:
            f"{R}/logs/{rep.target}.log",
        conda:
            "../envs/mop.yaml"
        params:
            what=lambda w, rep=rep: rep.name,
            files=lambda w, input: " ".join(
                f"--{arg} {' '.join(map(shlex.quote, input[arg]))}" for arg in input.keys()
            ),
            out=lambda w, output: os.path.splitext(output[0])[0],
        shell:
            "mop report {params.what} {params.files} --out {params.out} 2> {log:q}"


rule publish:
    input:
        lambda w: report_targets(PLAN),
    output:
        f"{R}/report/run.json",
    log:
        f"{R}/logs/report/publish.log",
    conda:
        "../envs/mop.yaml"
    params:
        results=lambda w, output: os.path.dirname(os.path.dirname(output[0])),
    shell:
        "mop publish --results {params.results} --artifacts {input} 2> {log:q}"
