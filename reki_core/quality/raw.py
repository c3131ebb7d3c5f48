"""The raw-data rules and suites: one per raw dataset (interactions, users, items).

The rules run twice: at landing, in Spark (spark_jobs/landing.py), and as the raw gate on the landed partitions of
`dt` (defence in depth before anything downstream reads them). The users and items suites run on Spark DataFrames
(GX's Spark datasource, Connect DataFrames included: docs/design.md "Landing in Spark"). The interactions' row rules
are Spark columns at landing (`interactions_row_rules`: each bad row needs its reason, for the error or the
quarantine, and the first copy of a repeated row is kept), and GX validates their per-day counts
(`summary_expectations`); the raw gate runs the interactions suite on the landed day (the day's increment, pandas).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import great_expectations.expectations as gxe

from reki_core.datasets import schema

# Expectation type -> the rule name used in error messages.
RULE_NAMES = {
    "expect_column_values_to_not_be_null": "not_null",
    "expect_column_values_to_be_between": "in_range",
    "expect_compound_columns_to_be_unique": "unique",
    "expect_column_values_to_be_unique": "unique",
    "expect_table_row_count_to_be_between": "row_count",
    "expect_table_columns_to_match_set": "schema",
    "expect_column_value_lengths_to_be_between": "length",
}


def interactions_row_expectations(day: dt.date) -> list:
    """Row-level rules: each failing row can be named and quarantined."""
    start, end = schema.day_bounds(day)
    return [
        *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in schema.INTERACTIONS],
        gxe.ExpectColumnValuesToBeBetween(column="rating", min_value=schema.RATING_MIN, max_value=schema.RATING_MAX),
        gxe.ExpectColumnValuesToBeBetween(column="ts", min_value=start, max_value=end - 1),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id", "ts"]),
    ]


def interactions_expectations(day: dt.date, max_rows: int) -> list:
    """The full gate on a landed day: schema, row rules and row-count bounds (0 rows = no new data)."""
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(schema.INTERACTIONS), exact_match=True),
        gxe.ExpectColumnValuesToBeInTypeList(column="rating", type_list=["int32", "int64", "Int32", "Int64"]),
        gxe.ExpectColumnValuesToBeInTypeList(column="ts", type_list=["int64", "Int64"]),
        *interactions_row_expectations(day),
        gxe.ExpectTableRowCountToBeBetween(min_value=0, max_value=max_rows),
    ]


@dataclass(frozen=True)
class Rule:
    """A row rule of the interactions, as Spark computes it (spark_jobs/landing.py `interaction_checks`): `not_null`,
    `in_range` (min..max, nulls pass) or `unique` (of the columns, the first copy kept)."""

    column: str
    rule: str
    min_value: int | None = None
    max_value: int | None = None

    @property
    def summary_column(self) -> str:
        """Its column in a summary frame: "unique(user_id)"."""
        return f"{self.rule}({self.column})"

    @property
    def bound(self) -> str:
        return f" ({self.min_value}..{self.max_value})" if self.rule == "in_range" else ""


def interactions_row_rules(day: dt.date) -> tuple[Rule, ...]:
    """The row rules of a day's interactions, in the order their problems are reported (as the suite's)."""
    start, end = schema.day_bounds(day)
    return (*[Rule(c, "not_null") for c in schema.INTERACTIONS],
            Rule("rating", "in_range", schema.RATING_MIN, schema.RATING_MAX), Rule("ts", "in_range", start, end - 1),
            Rule("user_id,item_id,ts", "unique"))


def users_expectations() -> list:
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(schema.USERS), exact_match=True),
        gxe.ExpectColumnValuesToNotBeNull(column="user_id"),
        gxe.ExpectColumnValuesToBeUnique(column="user_id"),
        gxe.ExpectColumnValuesToBeBetween(column="age", min_value=1, max_value=120),
    ]


def items_expectations() -> list:
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(schema.ITEMS), exact_match=True),
        gxe.ExpectColumnValuesToNotBeNull(column="item_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="title"),
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="title", min_value=1, max_value=500),
    ]


def summary_expectations(rules) -> list:
    """Each rule's count of offending rows (a column of a summary frame, one row per day) must be 0."""
    return [gxe.ExpectColumnValuesToBeBetween(column=r.summary_column, min_value=0, max_value=0) for r in rules]
