"""English and Russian for the web UI.

Templates write English text inside ``_()``; Russian comes from the table below,
and anything missing falls back to English. A test checks that every string the
templates use has its Russian line, so the table cannot silently fall behind.
"""

from __future__ import annotations

# ruff: noqa: RUF001 - the Russian table is Cyrillic on purpose

LANGUAGES = ("en", "ru")

RU: dict[str, str] = {
    "Overview": "Обзор",
    "Events": "События",
    "Quarantine": "Карантин",
    "Audit log": "Журнал действий",
    "Log out": "Выйти",
    "Log in": "Войти",
    "User": "Пользователь",
    "Password": "Пароль",
    "Wrong user name or password.": "Неверное имя пользователя или пароль.",
    "No users are configured: add [[monitor.users]] to the config file.": (
        "Пользователи не настроены: добавьте [[monitor.users]] в файл конфигурации."
    ),
    "viewer": "наблюдатель",
    "admin": "администратор",
    "Destination": "Назначение",
    "Source": "Источник",
    "Delivered": "Доставлено",
    "Pending": "В очереди",
    "In flight": "Отправляется",
    "Retrying": "Повтор",
    "Failed": "Ошибка",
    "Missing": "Потеряно",
    "Coalesced": "Объединено",
    "Quarantined": "В карантине",
    "delivered": "доставлено",
    "pending": "в очереди",
    "in_flight": "отправляется",
    "retry_wait": "повтор",
    "failed": "ошибка",
    "expired": "потеряно",
    "coalesced": "объединено",
    "Delivered and failed per hour, last 24 hours": "Доставлено и с ошибкой по часам за 24 часа",
    "Oldest pending event": "Самое старое событие в очереди",
    "Delivery lag": "Задержка доставки",
    "none": "нет",
    "Circuit breaker": "Автоматический выключатель",
    "open until": "открыт до",
    "closed": "закрыт",
    "Problem": "Проблема",
    "Throttle": "Ограничение скорости",
    "requests available": "запросов доступно",
    "Recovered by polling": "Найдено опросом",
    "Replicas": "Реплики",
    "Live replicas split each CRM's rate limit; the oldest one polls the helpdesks.": (
        "Работающие реплики делят между собой лимит запросов каждой CRM; "
        "хелпдески опрашивает запущенная раньше всех."
    ),
    "Host": "Хост",
    "Version": "Версия",
    "Running since": "Работает с",
    "Last heartbeat": "Последний сигнал",
    "live": "работает",
    "gone": "пропала",
    "Poller": "Опрос",
    "Last success": "Последний успех",
    "Last error": "Последняя ошибка",
    "Filter": "Фильтр",
    "Clear": "Сбросить",
    "State": "Состояние",
    "any": "любое",
    "all": "все",
    "Ticket": "Тикет",
    "Client e-mail or phone": "E-mail или телефон клиента",
    "Error text": "Текст ошибки",
    "From": "С",
    "To": "По",
    "Received": "Получено",
    "Kind": "Тип",
    "Attempts": "Попытки",
    "Client": "Клиент",
    "Newer": "Новее",
    "Older": "Старше",
    "No events match this filter.": "Нет событий по этому фильтру.",
    "Resend selected": "Отправить выбранные повторно",
    "Resend all matching": "Отправить повторно все найденные",
    "Resend": "Отправить повторно",
    "Event": "Событие",
    "Ticket trace": "История тикета",
    "Where it landed": "Где в CRM",
    "Open in CRM": "Открыть в CRM",
    "not created yet": "ещё не создано",
    "contact": "контакт",
    "deal": "сделка",
    "Deliveries": "Доставки",
    "Attempt": "Попытка",
    "Started": "Начало",
    "Duration": "Длительность",
    "HTTP status": "HTTP-статус",
    "Outcome": "Результат",
    "Error": "Ошибка",
    "Next attempt": "Следующая попытка",
    "Mapping plan with the current config": "План по текущим правилам",
    "Rule": "Правило",
    "no rule matched": "ни одно правило не подошло",
    "Payload": "Содержимое",
    "Reason": "Причина",
    "Re-ingest": "Принять заново",
    "Nothing is held in quarantine.": "Карантин пуст.",
    "Headers": "Заголовки",
    "Body": "Тело запроса",
    "When": "Когда",
    "Who": "Кто",
    "Action": "Действие",
    "Count": "Количество",
    "Details": "Подробности",
    "Confirm resend": "Подтвердите повторную отправку",
    "deliveries match this filter and will be queued again, each with a fresh retry window of": (
        "доставок подходят под фильтр и будут поставлены в очередь заново, каждая с новым окном "
        "повторов"
    ),
    "hours": "ч",
    "Nothing matches this filter.": "Под фильтр ничего не подходит.",
    "Cancel": "Отмена",
    "Resend progress": "Ход повторной отправки",
    "running": "выполняется",
    "done": "готово",
    "interrupted": "прервано",
    "of": "из",
    "Back to events": "К событиям",
    "queued again": "поставлено в очередь заново",
    "Only an admin may do this.": "Это может сделать только администратор.",
    "Not found": "Не найдено",
    "Page": "Страница",
    "recovered by polling": "найдено опросом",
    "Destinations": "Назначения",
    "Totals": "Итого",
    "as of": "по состоянию на",
    "Held": "Задержано",
    "Re-ingested as events": "Принято как события",
    "Still unreadable": "По-прежнему не читается",
    "minutes": "мин",
    "seconds": "с",
    "Language": "Язык",
    "Bad request": "Неверный запрос",
    "Next page": "Следующая страница",
    "Record": "Запись",
    "Too many failed logins. Try again in": (
        "Слишком много неудачных попыток входа. Повторите через"
    ),
}

_TABLES = {"ru": RU}


def translator(language: str) -> _Translator:
    return _Translator(_TABLES.get(language, {}))


class _Translator:
    def __init__(self, table: dict[str, str]) -> None:
        self._table = table

    def __call__(self, text: str) -> str:
        return self._table.get(text, text)


def pick_language(configured: str, chosen: str | None, accept_language: str | None) -> str:
    """The config wins, then the user's own choice, then the browser's preference."""
    if configured in LANGUAGES:
        return configured
    if chosen in LANGUAGES:
        return str(chosen)
    for part in (accept_language or "").split(","):
        tag = part.split(";")[0].strip().lower()[:2]
        if tag in LANGUAGES:
            return tag
    return "en"
