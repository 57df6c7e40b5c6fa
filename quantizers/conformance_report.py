"""The conformance kit's results: one ``CheckResult`` per (check, configuration), gathered in a ``Report``."""

from __future__ import annotations

from dataclasses import dataclass, field

CHECKS = ("grid", "idempotent", "shape-dtype", "state-dict", "init", "extremes", "options", "gradients", "stages",
          "step-hook")


@dataclass
class CheckResult:
    check: str
    bits: int
    signed: bool
    role: str
    status: str  # "pass", "fail" or "n/a"
    detail: str = ""
    examples: int = 0

    @property
    def config(self) -> str:
        return f"{self.bits}-bit {'signed' if self.signed else 'unsigned'} {self.role}"


@dataclass
class Report:
    name: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(result.status != "fail" for result in self.results)

    def failures(self) -> list[CheckResult]:
        return [result for result in self.results if result.status == "fail"]

    def summary_rows(self) -> list[tuple[str, str, str]]:
        """(check, status, detail) per check over all configurations, in CHECKS order."""
        rows = []
        for check in CHECKS:
            results = [result for result in self.results if result.check == check]
            if not results:
                continue
            failed = [result for result in results if result.status == "fail"]
            not_applicable = [result for result in results if result.status == "n/a"]
            examples = sum(result.examples for result in results)
            if failed:
                status, detail = "FAIL", f"{failed[0].config}: {failed[0].detail}"
            elif len(not_applicable) == len(results):
                status, detail = "n/a", not_applicable[0].detail
            else:
                status = "pass"
                detail = f"{len(results) - len(not_applicable)} configurations"
                if examples:
                    detail += f", {examples} examples"
                if not_applicable:
                    detail += f"; n/a for {len(not_applicable)} ({not_applicable[0].detail})"
            rows.append((check, status, detail))
        return rows

    def table(self) -> str:
        width = max(len(check) for check in CHECKS)
        lines = [f"conformance of quantizer '{self.name}'"]
        lines += [f"  {check:<{width}}  {status:<4}  {detail}" for check, status, detail in self.summary_rows()]
        return "\n".join(lines)
