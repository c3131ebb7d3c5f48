"""The raw-data suites: one per raw dataset (interactions, users, items).

The same expectations run twice: at landing, on each incoming delivery with every unexpected row
index (so bad rows are named, or quarantined with their reason), and as the raw gate on the landed
partitions of `dt` (defence in depth before anything downstream reads them).
"""

from __future__ import annotations

import datetime as dt

import great_expectations.expectations as gxe

from reki_core.datasets import schema

# Expectation type -> the rule name used in error messages and in `_reason` of rejected rows.
RULE_NAMES = {
    "expect_column_values_to_not_be_null": "not_null",
    "expect_column_values_to_be_between": "in_range",
    "expect_compound_columns_to_be_unique": "unique",
    "expect_column_values_to_be_unique": "unique",
    "expect_table_row_count_to_be_between": "row_count",
    "expect_table_columns_to_match_set": "schema",
    "expect_column_value_lengths_to_be_between": "length",
}


def day_bounds(day: dt.date) -> tuple[int, int]:
    """[start, end) of a UTC day in epoch seconds."""
    start = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())
    return start, start + 86_400


def interactions_row_expectations(day: dt.date) -> list:
    """Row-level rules: each failing row can be named and quarantined."""
    start, end = day_bounds(day)
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
