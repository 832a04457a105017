"""The output records, defined once (schema), built (records), shown as text (render, report) through one sanitizer (textsafe)."""
