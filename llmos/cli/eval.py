"""`llmos eval SUITE.yaml`: run a suite over its matrix, store the run, compare it with a
baseline, write reports, and exit 0 (every gate holds), 1 (a gate failed: named) or 2 (the
suite or an option is wrong)."""

from __future__ import annotations

from pathlib import Path

import typer

from llmos.cli.kernel_view import DB, db_path


def eval_(
    suite: Path = typer.Argument(..., help="A suite file (promptfoo-style YAML)."),
    repeat: int = typer.Option(1, "--repeat", "-n", help="Fresh samples per case (pass^k)."),
    baseline: str | None = typer.Option(
        None, "--baseline", help="'last' or a run id: list the cases that flipped."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write result.json, junit.xml and report.md here."
    ),
    html: bool = typer.Option(False, "--html", help="Also write report.html (needs --out)."),
    seed: int = typer.Option(0, "--seed", help="The engines' seed (requests without their own)."),
    no_store: bool = typer.Option(False, "--no-store", help="Do not record the run."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the gates."),
    db: str | None = DB,
) -> None:
    """Run an eval suite and gate on it."""
    from llmos.evals import gates, history, report
    from llmos.evals.runner import run_suite
    from llmos.evals.suite import SuiteError, load_suite

    def config_error(message: str) -> typer.Exit:
        typer.secho(f"error: {message}", err=True, fg="red")
        return typer.Exit(gates.EXIT_CONFIG)

    if html and out is None:
        raise config_error("--html writes report.html into the --out folder; give --out")
    if baseline is not None and no_store:
        raise config_error("--baseline reads the stored runs; it cannot go with --no-store")
    try:
        spec = load_suite(suite)
        store = None if no_store else history.History(db_path(db))
        base_id = None
        if baseline is not None and store is not None:
            base_id = store.resolve(baseline, spec.path)
            if base_id is None and baseline != "last":
                raise SuiteError(f"--baseline: no run {baseline!r} in {db_path(db)}")
        say = None if quiet else (lambda line: typer.secho(line, err=True, dim=True))
        result = run_suite(spec, repeat=repeat, progress=say, seed=seed)
    except SuiteError as exc:
        raise config_error(str(exc)) from None
    result["gates"] = gates.check(result, spec.gates)
    if base_id is not None and store is not None:
        result["baseline"] = {
            "run_id": base_id,
            "flips": history.flips(result, store.verdicts(base_id)),
        }  # noqa: E501
    if store is not None:
        store.save(result, seed=seed)
        store.close()
    if out is not None:
        for path in report.write(result, out, html=html):
            typer.secho(f"wrote {path}", err=True, dim=True)
    if not quiet:
        typer.echo(report.to_markdown(result))
    else:
        for g in result["gates"]:
            typer.echo(f"{'PASS' if g['passed'] else 'FAIL'} {g['name']}: {g['detail']}")
    failed = [g["name"] for g in result["gates"] if not g["passed"]]
    if failed:
        typer.secho(f"gate failed: {', '.join(failed)}", err=True, fg="red")
    typer.secho(f"run {result['run_id']}", err=True, dim=True)
    raise typer.Exit(gates.exit_code(result["gates"]))


def register(app: typer.Typer) -> None:
    app.command(name="eval")(eval_)
