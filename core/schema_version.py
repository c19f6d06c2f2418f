"""The measurement database's current schema version: one number.

probes/schema.py's ``MIGRATIONS`` end at this version (it refuses to load
otherwise); analysis/ compares a database's ``schema_migrations`` with it to
refuse a database an older Vantage made (and not yet migrated) in one line,
without importing probes/. Appending a migration means raising this number.
"""

SCHEMA_VERSION = 6
