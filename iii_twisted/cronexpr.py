"""
Cron expressions in the format iii uses (the Rust ``cron`` crate 0.15), in UTC.

Six or seven fields separated by whitespace::

    second minute hour day-of-month month day-of-week [year]

- second 0-59, minute 0-59, hour 0-23, day-of-month 1-31, month 1-12 (or JAN..DEC,
  JANUARY..DECEMBER), day-of-week 1-7 with **1 = Sunday** (or SUN..SAT,
  SUNDAY..SATURDAY; 0 is invalid), year 1970-2100 (any year when absent);
- each field is ``*``, a value, a range ``a-b``, a step ``*/n``, ``a/n`` (from a to
  the end) or ``a-b/n``, or a comma-separated list of those; ``?`` means ``*`` in
  day-of-month and day-of-week; names are case-insensitive;
- day-of-month **and** day-of-week must both match (not "either", as in Vixie cron);
- shorthands: ``@yearly``, ``@monthly``, ``@weekly`` (Sunday), ``@daily``,
  ``@hourly``, each at second 0.

Five-field Unix expressions are rejected (the first field is seconds here).

Why not a library: croniter reads seconds as an optional *trailing* sixth field, has no
year field and numbers days of the week from 0 = Sunday, so it would silently misread
iii expressions; the format is small enough to parse here exactly.
"""

import calendar
from datetime import datetime, timezone

_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december"]
_DAYS = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"]


def _names(full):
    names = {}
    for i, name in enumerate(full, 1):
        names[name] = i
        names[name[:3]] = i
    return names


# (name, lowest, highest, names, accepts "?")
_FIELDS = [
    ("seconds", 0, 59, {}, False),
    ("minutes", 0, 59, {}, False),
    ("hours", 0, 23, {}, False),
    ("days of month", 1, 31, {}, True),
    ("months", 1, 12, _names(_MONTHS), False),
    ("days of week", 1, 7, _names(_DAYS), True),
    ("years", 1970, 2100, {}, False),
]

_SHORTHANDS = {
    "@yearly": "0 0 0 1 1 * *",
    "@monthly": "0 0 0 1 * * *",
    "@weekly": "0 0 0 * * 1 *",
    "@daily": "0 0 0 * * * *",
    "@hourly": "0 0 * * * * *",
}


class CronError(ValueError):
    """An expression that is not valid; the message says what is wrong."""


def _value(text, field):
    name, low, high, names, _ = field
    lowered = text.lower()
    if lowered in names:
        return names[lowered]
    if not text.isdigit():
        raise CronError("{!r} is not a number{} in the {} field".format(
            text, " or a name" if names else "", name))
    value = int(text)
    if not low <= value <= high:
        raise CronError("{} is out of range for {} ({}-{})".format(value, name, low, high))
    return value


def _parse_field(text, field):
    name, low, high, _, question = field
    values = set()
    for part in text.split(","):
        if not part:
            raise CronError("empty list item in the {} field {!r}".format(name, text))
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError("step {!r} in the {} field must be a positive "
                                "number".format(step_text, name))
            step = int(step_text)
        if base == "*" or (base == "?" and question):
            start, end = low, high
        elif base == "?":
            raise CronError("'?' is only allowed in the days of month and days of week "
                            "fields")
        elif "-" in base:
            a, _, b = base.partition("-")
            start, end = _value(a, field), _value(b, field)
            if start > end:
                raise CronError("range {!r} in the {} field goes backwards".format(base, name))
        else:
            start = _value(base, field)
            end = high if slash else start
        values.update(range(start, end + 1, step))
    return frozenset(values)


class CronSchedule:
    """
    A parsed expression.

    @ivar expression: the text it was parsed from.
    """

    def __init__(self, expression):
        """@raise CronError: for an expression that is not valid."""
        if not isinstance(expression, str):
            raise CronError("the expression must be a string")
        self.expression = expression
        text = expression.strip()
        text = _SHORTHANDS.get(text.lower(), text)
        parts = text.split()
        if len(parts) not in (6, 7):
            raise CronError(
                "expected 6 or 7 fields (second minute hour day-of-month month "
                "day-of-week [year]), got {}".format(len(parts)))
        if len(parts) == 6:
            parts.append("*")
        (self.seconds, self.minutes, self.hours, self.days, self.months,
         self.weekdays, self.years) = [
            sorted(_parse_field(part, field)) for part, field in zip(parts, _FIELDS)]
        self._days = frozenset(self.days)
        self._weekdays = frozenset(self.weekdays)

    def next_after(self, when):
        """
        @param when: a time, in seconds since the epoch (a float is fine).
        @return: the first matching time strictly after C{when}, in whole epoch
            seconds, or None if there is none (before the end of 2100).
        """
        start = datetime.fromtimestamp(int(when // 1) + 1, timezone.utc)
        found = self._search(start)
        return None if found is None else calendar.timegm(found.timetuple())

    def _search(self, t):
        for year in self.years:
            if year < t.year:
                continue
            same_year = year == t.year
            for month in self.months:
                if same_year and month < t.month:
                    continue
                same_month = same_year and month == t.month
                last_day = calendar.monthrange(year, month)[1]
                for day in self.days:
                    if day > last_day:
                        break
                    if same_month and day < t.day:
                        continue
                    # Python: Monday = 0; iii: Sunday = 1.
                    if (calendar.weekday(year, month, day) + 1) % 7 + 1 not in self._weekdays:
                        continue
                    same_day = same_month and day == t.day
                    for hour in self.hours:
                        if same_day and hour < t.hour:
                            continue
                        same_hour = same_day and hour == t.hour
                        for minute in self.minutes:
                            if same_hour and minute < t.minute:
                                continue
                            same_minute = same_hour and minute == t.minute
                            for second in self.seconds:
                                if same_minute and second < t.second:
                                    continue
                                return datetime(year, month, day, hour, minute, second,
                                                tzinfo=timezone.utc)
        return None
