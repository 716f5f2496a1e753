# ruff: noqa: E501 - breaks quote source lines verbatim
"""Hand-written breaks, one per promise (issue 16): applied one at a time to a scratch copy
by `tools/mutate.py break-it`; the tests named for each must fail on it. The ``old`` text
must occur exactly once in ``path``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Break:
    ident: str
    promise: str
    how: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


D = "tests/test_promises_disconnect.py::"
L = "tests/test_promises_login.py::"
S = "tests/test_promises_secrets.py::"
U = "tests/test_promises_unpadding.py::"
T = "tests/test_daemon_socket.py::"

BREAKS: list[Break] = [
    Break(
        "B1",
        "a client that disconnects leaves the card unverified",
        "`close_application` forgets the logins without `_release_login`",
        "tokend/session.py",
        """        for key in list(app.logins):
            await self._release_login(app, key)
        self.apps.pop(app.id, None)""",
        """        app.logins.clear()
        self.apps.pop(app.id, None)""",
        (D + "test_a_client_that_disconnects_leaves_the_card_unverified",),
    ),
    Break(
        "B2",
        "closing the last session logs out and resets the card",
        "`close_session` drops the session only",
        "tokend/session.py",
        """            # PKCS#11: closing the last session of a token logs the application out.
            await self._release_login(app, session.instance.key)""",
        """            pass""",
        (D + "test_closing_the_last_session_leaves_the_card_unverified",),
    ),
    Break(
        "B3",
        "C_CloseAllSessions logs out and resets the card",
        "`close_all_sessions` forgets the logins without `_release_login`",
        "tokend/session.py",
        """        for key in [k for k in app.logins if k[0] == slot_id]:
            await self._release_login(app, key)""",
        """        for key in [k for k in app.logins if k[0] == slot_id]:
            app.logins.discard(key)""",
        (D + "test_closing_all_sessions_leaves_the_card_unverified",),
    ),
    Break(
        "B4",
        "the card reset happens only when no other application is logged in",
        "`_release_login` resets the card even when another application is logged in",
        "tokend/session.py",
        """            if instance.retired or any(key in other.logins for other in self.apps.values()):
                return""",
        """            if instance.retired:
                return""",
        (D + "test_a_client_leaving_keeps_the_card_verified_for_another_logged_in_client",),
    ),
    Break(
        "B5",
        "a result arriving after retirement is dropped",
        "`TokenInstance.run` no longer checks `retired` after the call",
        "tokend/registry.py",
        """        if self.retired:
            raise DeviceRemovedError(f"token in slot {self.slot_id} was removed during the call")""",
        """        pass""",
        (D + "test_an_answer_that_arrives_after_the_token_left_is_dropped",),
    ),
    Break(
        "B6",
        "ARRIVED on an occupied slot retires the old instance",
        "`handle_event` replaces the instance without retiring it",
        "tokend/registry.py",
        """        if slot.instance is not None and not slot.instance.retired:
            self.retire(slot.instance, "token replaced")""",
        """        pass""",
        (D + "test_arrived_for_an_occupied_slot_retires_the_old_instance",),
    ),
    Break(
        "B7",
        "a PIN-always decryption sends VERIFY right before the operation",
        "the driver's card section skips the VERIFY of the context PIN",
        "drivers/piv.py",
        """            if context_pin is not None:
                self._verify(context_pin)
            yield""",
        """            yield""",
        (L + "test_pin_always_decryption_sends_verify_then_the_operation",),
    ),
    Break(
        "B8",
        "VERIFY and the operation share one exclusive section (real PC/SC transaction)",
        "the applet base's `_session` enters a `nullcontext` instead of the transaction",
        "drivers/applet.py",
        """                stack.enter_context(self._transport.transaction())""",
        """                stack.enter_context(__import__("contextlib").nullcontext())""",
        (
            L + "test_verify_and_operation_share_one_pcsc_transaction",
            L + "test_the_driver_runs_verify_and_the_operation_in_one_exclusive_section",
        ),
    ),
    Break(
        "B9",
        "a wrong context-specific PIN is refused at C_Login and counts one try",
        "`Engine.login` keeps the context PIN without verifying it",
        "tokend/session.py",
        """                async with self._login_lock(instance):
                    await self._verify(app, session, pin)
                # Kept only""",
        """                # Kept only""",
        (L + "test_wrong_context_pin_is_refused_at_the_login_and_counts_one_try",),
    ),
    Break(
        "B10",
        "the card's own 6982 loses every login on the token",
        "`Engine._card` re-raises the card's 6982 without forgetting the logins",
        "tokend/session.py",
        """            # driver's own "not logged in" refusals leave every login as it is.
            self._lost_card_login(instance)""",
        """            # driver's own "not logged in" refusals leave every login as it is.
            pass""",
        (L + "test_the_cards_own_6982_loses_every_login_on_the_token",),
    ),
    Break(
        "B11",
        "a right PIN resets the card's retry counter (the virtual card, as PIV says)",
        "the virtual card leaves the counter where it was after a right PIN",
        "simulators/piv.py",
        """            if counter.left != counter.max_tries:
                counter.left = counter.max_tries""",
        """            if counter.left != counter.max_tries:
                pass""",
        (
            L + "test_wrong_context_pin_is_refused_at_the_login_and_counts_one_try",
            "tests/test_e2e_memory.py::test_wrong_pin_reports_retries_and_is_not_retried",
        ),
    ),
    Break(
        "B12",
        "OAEP with a non-zero first byte is refused with the one error",
        "`oaep_unpad` no longer checks the first byte",
        "tokend/mechanisms/rsa_padding.py",
        """    good = _ct_eq(em[0], 0) & int(hmac.compare_digest(db[:h_len], l_hash))""",
        """    good = int(hmac.compare_digest(db[:h_len], l_hash))""",
        (U + "test_malformed_oaep_is_refused_with_the_one_error",),
    ),
    Break(
        "B13",
        "OAEP with a non-zero byte before the 01 separator is refused with the one error",
        "`oaep_unpad` takes the first 01 as the separator without checking the bytes before it",
        "tokend/mechanisms/rsa_padding.py",
        """        invalid |= looking & (1 ^ is_zero) & (1 ^ is_one)""",
        """        invalid |= 0""",
        (U + "test_malformed_oaep_is_refused_with_the_one_error",),
    ),
    Break(
        "B14",
        "PKCS#1 v1.5 needs at least 8 padding bytes",
        "`pkcs1v15_unpad` accepts a short padding string",
        "tokend/mechanisms/rsa_padding.py",
        """    good &= _ct_ge(sep, 10)  # at least 8 padding bytes""",
        """    good &= 1""",
        (U + "test_malformed_pkcs1_is_refused_with_the_one_error",),
    ),
    Break(
        "B15",
        "an unpadding failure is one uniform error",
        "`oaep_unpad` reports a wrong label hash with its own message",
        "tokend/mechanisms/rsa_padding.py",
        """    if not good:
        raise EncryptedDataInvalidError()
    return db[sep + 1 :]""",
        """    if not hmac.compare_digest(db[:h_len], l_hash):
        raise EncryptedDataInvalidError("label hash mismatch")
    if not good:
        raise EncryptedDataInvalidError()
    return db[sep + 1 :]""",
        (U + "test_malformed_oaep_is_refused_with_the_one_error",),
    ),
    Break(
        "B16",
        "the PIN buffer of C_Login is zeroed after use",
        "`Engine.login` no longer zeroes the PIN in its `finally`",
        "tokend/session.py",
        """        finally:
            wipe(pin)""",
        """        finally:
            pass""",
        (S + "test_pin_buffers_are_zero_after_login_right_or_wrong",),
    ),
    Break(
        "B17",
        "the VERIFY block is zeroed after use",
        "the driver's `_verify` no longer wipes the padded PIN block",
        "drivers/piv.py",
        """            check_sw(self._send(CommandApdu(0, Ins.VERIFY, 0, PIN_REF, bytes(block))))
        finally:
            wipe(block)""",
        """            check_sw(self._send(CommandApdu(0, Ins.VERIFY, 0, PIN_REF, bytes(block))))
        finally:
            pass""",
        (S + "test_verify_blocks_are_zero_after_use",),
    ),
    Break(
        "B18",
        "a kept context PIN is zeroed when its operation ends",
        "`Operation.forget_context_pin` drops the reference without zeroing",
        "tokend/session.py",
        """            wipe(self.context_pin)
            self.context_pin = None""",
        """            self.context_pin = None""",
        (S + "test_a_kept_context_pin_is_zeroed_when_its_operation_ends",),
    ),
    Break(
        "B19",
        "a derived ECDH secret is zeroed when its token is retired",
        "`_on_retire` forgets session objects without wiping them",
        "tokend/session.py",
        """                for obj in session.objects.values():
                    obj.wipe()""",
        """                for obj in session.objects.values():
                    pass""",
        (S + "test_a_derived_ecdh_secret_is_zeroed_when_it_ends",),
    ),
    Break(
        "B20",
        "no PIN in the logs at DEBUG (arguments of a refused request)",
        "the daemon logs the params of a refused request at DEBUG",
        "tokend/daemon.py",
        """            log.debug("client %s: %s -> %s", self.app.peer, request.method, exc.ckr_name)""",
        """            log.debug("client %s: %s -> %s", self.app.peer, request, exc.ckr_name)""",
        (S + "test_no_pin_and_no_plaintext_in_any_log_text",),
    ),
    Break(
        "B21",
        "no PIN in the logs at the default level (repr of a nested object)",
        "the engine logs the operation (its dataclass repr holds the context PIN) at INFO",
        "tokend/session.py",
        """    async def _finish_sign(self, session: Session, data: bytes) -> bytes:
        op = self._take(session, OpKind.SIGN)""",
        """    async def _finish_sign(self, session: Session, data: bytes) -> bytes:
        op = self._take(session, OpKind.SIGN)
        log.info("signing: %r", op)""",
        (S + "test_no_pin_and_no_plaintext_in_any_log_text",),
    ),
    Break(
        "B22",
        "other uids are refused (SO_PEERCRED)",
        "`Daemon._admit` serves every uid",
        "tokend/daemon.py",
        """        if not is_trusted_uid(creds.uid):""",
        """        if False:""",
        (T + "test_other_users_are_refused",),
    ),
    Break(
        "B23",
        "a refused peer is closed at once (not left to time out)",
        "`Daemon._admit` leaves a refused peer's connection open and silent",
        "tokend/daemon.py",
        """                "refused", logging.WARNING, "refused client pid %d uid %d", creds.pid, creds.uid
            )
            conn.close()
            return""",
        """                "refused", logging.WARNING, "refused client pid %d uid %d", creds.pid, creds.uid
            )
            self.__dict__.setdefault("_left_open", []).append(conn)
            return""",
        (T + "test_other_users_are_refused",),
    ),
    Break(
        "B24",
        "a request line with no newline cannot grow the buffer past the limit",
        "`Connection.serve` checks the limit only when a newline arrives",
        "tokend/daemon.py",
        r"""                if b"\n" not in chunk:
                    if len(pending) > MAX_REQUEST_BYTES:""",
        r"""                if b"\n" not in chunk:
                    if False:""",
        (T + "test_oversized_request_closes_only_that_connection",),
    ),
    Break(
        "B25",
        "every malformed request gets an answer",
        "the daemon answers nothing to a line it cannot parse",
        "tokend/daemon.py",
        """            log.info("client %s: %s", self.app.peer, exc)
            return encode_error(exc.request_id, exc.code, str(exc))""",
        """            log.info("client %s: %s", self.app.peer, exc)
            return None""",
        (
            "tests/test_fuzz_protocol.py::test_mutated_and_random_requests_get_errors_and_service_continues",
        ),
    ),
    Break(
        "B26",
        "`tokend serve -v` logs no PIN",
        "`Engine.login` logs the PIN at DEBUG",
        "tokend/session.py",
        """            if user_type != CKU.CKU_USER:""",
        """            log.debug("login with %s", pin.decode())
            if user_type != CKU.CKU_USER:""",
        ("tests/test_serve_process.py::test_serve_simulated_token_and_graceful_sigterm",),
    ),
    Break(
        "B27",
        "a last logout racing another application's VERIFY cannot undo that login",
        "`_release_login` resets the card without taking the login lock",
        "tokend/session.py",
        """        # (and is recorded) first, so this reset cannot silently undo it.
        async with self._login_lock(instance):""",
        """        # (and is recorded) first, so this reset cannot silently undo it.
        if True:""",
        (
            "tests/test_review_disconnect_promise.py::"
            "test_last_logout_racing_another_login_does_not_undo_that_login",
        ),
    ),
    Break(
        "B28",
        "a transport failure during an operation retires the token (no LEFT needed)",
        "`TokenInstance.run` turns the failure into an error without retiring the instance",
        "tokend/registry.py",
        """            self.registry.retire(self, f"transport failure: {exc}")""",
        """            pass""",
        (D + "test_a_transport_failure_during_an_operation_retires_the_token",),
    ),
    Break(
        "B29",
        "a client that leaves takes its sessions (and their ECDH secrets) with it",
        "`close_application` releases the logins but keeps the client's sessions",
        "tokend/session.py",
        """        for handle in list(app.sessions):
            self._drop_session(app.sessions[handle])""",
        """        for handle in list(app.sessions):
            pass""",
        (S + "test_a_derived_ecdh_secret_is_zeroed_when_it_ends",),
    ),
    Break(
        "B30",
        "a lost card login (reset by another program) takes the kept context PINs with it",
        "`_lost_card_login` forgets the logins only",
        "tokend/session.py",
        """                app.post(lost)
            self._forget_context_pins(app, instance)""",
        """                app.post(lost)""",
        (S + "test_a_kept_context_pin_is_zeroed_when_its_operation_ends",),
    ),
    Break(
        "B31",
        "buffered input of an operation is zeroed when the operation is dropped",
        "`Operation.wipe` leaves the buffer",
        "tokend/session.py",
        """        self.forget_context_pin()
        wipe(self.buffer)""",
        """        self.forget_context_pin()""",
        (S + "test_buffered_data_to_sign_is_zeroed_when_the_token_leaves",),
    ),
    Break(
        "B32",
        "the login is checked when a decryption runs, not only at its Init",
        "`Engine.decrypt` skips `_require_login`",
        "tokend/session.py",
        """        op = self._take(session, OpKind.DECRYPT)
        try:
            self._require_login(session, op)""",
        """        op = self._take(session, OpKind.DECRYPT)
        try:""",
        (L + "test_a_login_lost_between_init_and_operation_is_not_covered_by_the_card",),
    ),
    Break(
        "B33",
        "the login is checked when a signature runs, not only at its Init",
        "`Engine._finish_sign` skips `_require_login`",
        "tokend/session.py",
        """        op = self._take(session, OpKind.SIGN)
        try:
            self._require_login(session, op)""",
        """        op = self._take(session, OpKind.SIGN)
        try:""",
        (L + "test_a_login_lost_between_init_and_operation_is_not_covered_by_the_card",),
    ),
    Break(
        "B34",
        "C_Login(CKU_CONTEXT_SPECIFIC) only for an operation on a PIN-always key",
        "`Engine.login` accepts a context login for any operation",
        "tokend/session.py",
        """                if op is None or not op.always_authenticate:""",
        """                if op is None:""",
        (L + "test_context_login_needs_an_operation_on_a_pin_always_key",),
    ),
    Break(
        "B35",
        "a context PIN kept for a decryption is zeroed when the decryption ends",
        "`Engine.decrypt` drops the operation without wiping it",
        "tokend/session.py",
        """                session, token.decrypt, op.key.key, op.mechanism, data, context_pin=op.context_pin
            )
        finally:
            op.wipe()""",
        """                session, token.decrypt, op.key.key, op.mechanism, data, context_pin=op.context_pin
            )
        finally:
            pass""",
        (S + "test_a_context_pin_kept_for_a_decryption_is_zeroed_after_it",),
    ),
]
